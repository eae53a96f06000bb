"""A tiny, randomly initialised Stable-Diffusion-shaped teacher for tests and CPU smoke runs.

It has the real component classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer, DDPMScheduler) at toy sizes and is written as a complete diffusers
StableDiffusionPipeline folder, so it is loaded through exactly the same code as a real teacher:

  images 64x64x3  <->  latents 16x16x4 (VAE factor 4), text embeddings [B, 77, 32].

Its outputs are meaningless (random weights); only shapes, dtypes and the data flow are real.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch

from text3d.errors import UserError
from text3d.teacher.tokenizer import MODEL_MAX_LENGTH, build_clip_tokenizer

IMAGE_SIZE = 64
LATENT_SIZE = 16
LATENT_CHANNELS = 4
TEXT_DIM = 32


def tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=2,  # diffusers' historical name: this is the number of heads
    )


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=0.18215,
    )


def tiny_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        projection_dim=TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def stable_diffusion_scheduler():
    """The DDPM training schedule of Stable Diffusion 1.x/2.x (scaled-linear betas 0.00085 .. 0.012)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, steps_offset=1)


def _write_folder(folder: Path, seed: int, words: Iterable[str] | None) -> None:
    from text3d.teacher.loader import model_index

    tokenizer = build_clip_tokenizer(folder / "tokenizer", words)
    # each component gets its own seed so changing one never changes the others' weights
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = tiny_unet()
        torch.manual_seed(seed + 1)
        vae = tiny_vae()
        torch.manual_seed(seed + 2)
        text_encoder = tiny_text_encoder(tokenizer)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    stable_diffusion_scheduler().save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")


def build_tiny_teacher(out_dir: str | os.PathLike, seed: int = 0, words: Iterable[str] | None = None,
                       overwrite: bool = False) -> Path:
    """Write a tiny random teacher into ``out_dir`` (a diffusers StableDiffusionPipeline folder).

    ``words`` is the tokenizer's whole-word vocabulary (default: the tokenizer module's list).
    The folder is built beside ``out_dir`` and renamed into place, so a crash leaves nothing half
    written. An existing non-empty ``out_dir`` is an error unless ``overwrite`` is set.
    """
    from text3d.teacher.loader import quiet_hf

    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; choose another folder or allow overwriting")
    from text3d.runtime.atomic import atomic_dir

    with atomic_dir(out) as tmp, quiet_hf():
        _write_folder(tmp, seed, words)
    return out
