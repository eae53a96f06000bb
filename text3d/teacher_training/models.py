"""The embedded teacher's architecture: Stable Diffusion's component classes at a size that trains
on 2 CPU cores in about two hours and fits in 40 MB (fp32).

  VAE           AutoencoderKL, 64x64x3 <-> 16x16x4 (3 levels, factor 4), channels 32/64/64,
                one ResNet per level (the decoder has two), attention in the 16x16 mid block.
                ~0.95 M parameters. The top level runs at 64x64, so its width sets the cost:
                32 channels is the cheapest that still reconstructs thin edges.
  UNet          UNet2DConditionModel on 16x16x4 latents, channels 64/128/128, one ResNet per
                level, cross-attention transformers at 16x16 and 8x8 and in the 4x4 mid block,
                4 heads. ~5.9 M parameters, ~24 MB fp32. Two ResNets per level cost 1.5x the
                time per step and would push the folder over 40 MB.
  text encoder  CLIPTextModel from scratch: width 128, 3 layers, 4 heads, 32 positions
                (captions of the world are ~10 tokens; 32 leaves room for prompts with words
                outside the vocabulary, which fall back to several byte-pair pieces). ~0.7 M.
  scheduler     DDPM, Stable Diffusion's scaled-linear betas 0.00085..0.012 over 1000 steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IMAGE_SIZE = 64
LATENT_SIZE = 16
LATENT_CHANNELS = 4
LOGVAR_INIT = -6.0  # initial posterior log-variance bias: std ~0.05


@dataclass
class Architecture:
    """Sizes of the three networks (the defaults are the shipped teacher)."""

    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 16
    unet_channels: tuple[int, ...] = (64, 128, 128)
    unet_layers_per_block: int = 1
    unet_attention: tuple[bool, ...] = (True, True, False)  # cross-attention per down level (16, 8, 4 px)
    unet_heads: int = 4
    unet_norm_groups: int = 32
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    text_length: int = 32  # tokenizer model_max_length = text encoder positions

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Architecture":
        data = dict(data)
        for key in ("vae_channels", "unet_channels", "unet_attention"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def build_vae(arch: Architecture, scaling_factor: float = 1.0, logvar_init: float = LOGVAR_INIT):
    """A fresh AutoencoderKL whose posterior starts narrow (log-variance bias ``logvar_init``).

    With the default initialisation the posterior std starts near 1, as large as the latents
    themselves, and shrinks only slowly: the decoder then trains on noise for hundreds of steps
    and learns blurry, colour-shifted reconstructions first.
    """
    import torch
    from diffusers import AutoencoderKL

    if len(arch.vae_channels) != 3:
        raise ValueError("the VAE needs 3 levels (64x64 images <-> 16x16 latents)")
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=tuple(arch.vae_channels),
        layers_per_block=arch.vae_layers_per_block,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=arch.vae_norm_groups,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
    )
    with torch.no_grad():
        vae.quant_conv.bias[LATENT_CHANNELS:].fill_(logvar_init)
    return vae


def build_unet(arch: Architecture):
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(arch.unet_attention))
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(arch.unet_channels),
        layers_per_block=arch.unet_layers_per_block,
        norm_num_groups=arch.unet_norm_groups,
        cross_attention_dim=arch.text_width,
        attention_head_dim=arch.unet_heads,  # diffusers' historical name: the number of heads
    )


def build_text_encoder(arch: Architecture, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch.text_width,
        intermediate_size=4 * arch.text_width,
        projection_dim=arch.text_width,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=arch.text_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModel(config)
    model.config.architectures = ["CLIPTextModel"]
    return model


def build_scheduler():
    from text3d.teacher.tiny import stable_diffusion_scheduler

    return stable_diffusion_scheduler()


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
