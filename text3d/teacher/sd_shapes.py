"""Stable-Diffusion-shaped random teachers: the published architectures of SD 1.5 and SD 2.1 / 2.1-base with
random weights, written as complete diffusers folders (beside :mod:`text3d.teacher.tiny`).

What is reproduced, per shape (the published ``config.json`` of each component):

  =============  ===========  ============  ===========================================================
  shape          image px     prediction    UNet / text encoder
  =============  ===========  ============  ===========================================================
  ``sd15``       512 (64²x4)  epsilon       320-640-1280-1280, 8 heads, 768-d context; CLIP ViT-L/14
                                            text tower: 12 layers, 768-d, 12 heads, 3072 MLP, quick_gelu
  ``sd21-base``  512 (64²x4)  epsilon       320-640-1280-1280, heads [5, 10, 20, 20] (64-d heads),
                                            linear projection in/out of the transformers, 1024-d context;
                                            OpenCLIP-H text tower as a CLIPTextModel: 23 layers (the
                                            penultimate of 24, as SD 2 uses it), 1024-d, 16 heads, 4096 MLP,
                                            gelu
  ``sd21``       768 (96²x4)  v_prediction  as sd21-base, attention upcast to fp32
  =============  ===========  ============  ===========================================================

All three share SD's VAE (128-256-512-512, 4 latent channels, factor 8, scaling 0.18215, 83.65 M parameters)
and the DDPM training schedule (scaled-linear betas 0.00085 .. 0.012 over 1000 steps). Parameter counts of the
full-width shapes: UNet 859.52 M (sd15) and 865.91 M (sd21), text encoders 123.06 M and 340.39 M
(:func:`parameter_counts` builds them on the ``meta`` device, so counting costs no memory).

The tokenizer is CLIP's real byte-level BPE (49408 tokens: 256 bytes, the same with ``</w>``, 48894 merges,
``<|startoftext|>``, ``<|endoftext|>``), converted at build time from the merges file that ships inside an
installed package (``open_clip``'s ``bpe_simple_vocab_16e6.txt.gz``; ``pip install --no-deps open_clip_torch``
is enough, nothing of it is imported) or a file given as ``bpe=``: ``vocab.json`` is the list above in that
order, ``merges.txt`` the first 48894 merges of the file. SD 2 pads with ``!`` (id 0), SD 1.5 with
``<|endoftext|>``, as their published tokenizers do.

``width="tiny"`` keeps every structural feature (block and head layout, linear projection, activation,
prediction type, sample size, 4-level VAE at factor 8) at toy channel widths, so tests run the real code paths
at 512 px in seconds; ``"full"`` is the real size (about 5.2 GB in fp32 on disk).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from text3d.errors import UserError

SHAPES = ("sd15", "sd21-base", "sd21")
WIDTHS = ("full", "tiny")
CLIP_VOCAB_SIZE = 49408
CLIP_MERGES = CLIP_VOCAB_SIZE - 256 * 2 - 2  # 48894
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
BPE_PACKAGES = ("open_clip", "clip")  # open_clip_torch and openai-clip ship the file at their package root


@dataclass(frozen=True)
class SDShape:
    """What distinguishes one published Stable Diffusion release from another."""

    name: str
    sample_size: int  # latent side (image side / 8)
    prediction_type: str
    heads: Any  # diffusers' `attention_head_dim` (a head count: 8, or one per block)
    cross_attention_dim: int
    linear_projection: bool
    upcast_attention: bool
    text_layers: int
    text_hidden: int
    text_heads: int
    text_mlp: int
    text_act: str
    text_projection: int
    pad_token: str
    scheduler: str  # the class name in the published scheduler/ folder


SD_SHAPES: dict[str, SDShape] = {
    "sd15": SDShape("sd15", 64, "epsilon", 8, 768, False, False, 12, 768, 12, 3072, "quick_gelu", 768,
                    "<|endoftext|>", "PNDMScheduler"),
    "sd21-base": SDShape("sd21-base", 64, "epsilon", [5, 10, 20, 20], 1024, True, False, 23, 1024, 16, 4096, "gelu",
                         512, "!", "PNDMScheduler"),
    "sd21": SDShape("sd21", 96, "v_prediction", [5, 10, 20, 20], 1024, True, True, 23, 1024, 16, 4096, "gelu", 512,
                    "!", "DDIMScheduler"),
}

# tiny widths: channels / 8 (heads of sd21 keep their counts at 8-d heads), 2 text layers of 32-d
_TINY_BLOCKS = (40, 80, 160, 160)
_TINY_VAE_BLOCKS = (8, 16, 16, 16)


def get_shape(name: str) -> SDShape:
    if name not in SD_SHAPES:
        raise UserError(f"unknown Stable Diffusion shape {name!r}: expected one of {', '.join(SHAPES)}")
    return SD_SHAPES[name]


def unet_config(shape: SDShape, width: str = "full") -> dict:
    """The UNet2DConditionModel keyword arguments of the published ``unet/config.json``."""
    tiny = width == "tiny"
    heads = shape.heads if not tiny or isinstance(shape.heads, list) else 4
    return {
        "sample_size": shape.sample_size, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
        "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": list(_TINY_BLOCKS if tiny else (320, 640, 1280, 1280)),
        "layers_per_block": 1 if tiny else 2, "downsample_padding": 1, "mid_block_scale_factor": 1,
        "act_fn": "silu", "norm_num_groups": 8 if tiny else 32, "norm_eps": 1e-5,
        "cross_attention_dim": 32 if tiny else shape.cross_attention_dim,
        "attention_head_dim": heads, "use_linear_projection": shape.linear_projection,
        "upcast_attention": shape.upcast_attention, "dual_cross_attention": False, "only_cross_attention": False,
        "num_class_embeds": None, "class_embed_type": None, "resnet_time_scale_shift": "default",
    }


def vae_config(shape: SDShape, width: str = "full") -> dict:
    """SD's AutoencoderKL (the same for 1.5 and 2.x; its sample size is the image side)."""
    tiny = width == "tiny"
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": list(_TINY_VAE_BLOCKS if tiny else (128, 256, 512, 512)),
        "layers_per_block": 1 if tiny else 2, "norm_num_groups": 8 if tiny else 32,
        "sample_size": shape.sample_size * 8, "scaling_factor": 0.18215,
    }


def text_config(shape: SDShape, width: str = "full", vocab_size: int = CLIP_VOCAB_SIZE, bos: int = CLIP_VOCAB_SIZE - 2,
                eos: int = CLIP_VOCAB_SIZE - 1, pad: int | None = None) -> dict:
    """CLIPTextConfig keyword arguments: ViT-L/14's text tower (sd15) or OpenCLIP-H's, 23 layers (sd21)."""
    tiny = width == "tiny"
    return {
        "vocab_size": vocab_size, "hidden_size": 32 if tiny else shape.text_hidden,
        "intermediate_size": 64 if tiny else shape.text_mlp, "projection_dim": 32 if tiny else shape.text_projection,
        "num_hidden_layers": 2 if tiny else shape.text_layers, "num_attention_heads": 4 if tiny else shape.text_heads,
        "max_position_embeddings": 77, "hidden_act": shape.text_act, "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos if pad is None else pad,
    }


def scheduler_config(shape: SDShape) -> dict:
    """The published scheduler/ config (the loader reads any of them as a DDPMScheduler: same betas)."""
    common = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "prediction_type": shape.prediction_type, "clip_sample": False, "set_alpha_to_one": False,
              "steps_offset": 1, "trained_betas": None}
    if shape.scheduler == "PNDMScheduler":
        return {**common, "skip_prk_steps": True}
    return common


def _scheduler(shape: SDShape):
    import diffusers

    cls = getattr(diffusers, shape.scheduler)
    cfg = scheduler_config(shape)
    if shape.scheduler == "PNDMScheduler":
        cfg.pop("clip_sample")
    return cls(**cfg)


def parameter_counts(shape_name: str, width: str = "full") -> dict[str, int]:
    """Parameters of each network of ``shape_name``, built on the meta device (no memory, under a second)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from text3d.teacher.loader import quiet_hf

    shape = get_shape(shape_name)
    with torch.device("meta"), quiet_hf():
        nets = {"unet": UNet2DConditionModel(**unet_config(shape, width)),
                "vae": AutoencoderKL(**vae_config(shape, width)),
                "text_encoder": CLIPTextModel(CLIPTextConfig(**text_config(shape, width)))}
    return {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}


# ------------------------------------------------------------------------------------------------ tokenizer
def find_clip_bpe(path: str | os.PathLike | None = None) -> Path:
    """The CLIP merges file: ``path`` if given, else ``bpe_simple_vocab_16e6.txt.gz`` inside an installed
    ``open_clip`` or ``clip`` package (found without importing it). One-line UserError when there is none."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"CLIP BPE merges file {p} does not exist")
        return p
    for package in BPE_PACKAGES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        for folder in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(folder) / BPE_FILE
            if candidate.is_file():
                return candidate
    raise UserError(f"CLIP's BPE merges file ({BPE_FILE}) was not found: install the package that ships it "
                    f"(pip install --no-deps open_clip_torch) or pass --bpe FILE")


def read_clip_merges(bpe_path: str | os.PathLike, n_merges: int = CLIP_MERGES) -> list[tuple[str, str]]:
    """The first ``n_merges`` merges of a CLIP ``bpe_simple_vocab`` file (gzip or plain text; line 1 is a header)."""
    path = Path(bpe_path)
    raw = path.read_bytes()
    text = gzip.decompress(raw).decode("utf-8") if raw[:2] == b"\x1f\x8b" else raw.decode("utf-8")
    lines = text.split("\n")[1: n_merges + 1]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    if any(len(m) != 2 for m in merges):
        raise UserError(f"{path} is not a CLIP BPE merges file (a line is not two symbols)")
    return merges  # type: ignore[return-value]


def clip_bpe_vocab(merges) -> dict[str, int]:
    """CLIP's vocabulary: the 256 byte symbols in CLIP's order (the printable bytes ``!``..``~``, ``¡``..``¬``,
    ``®``..``ÿ`` first, then the other bytes mapped to code points 256, 257, ...), the same with ``</w>``, one
    token per merge in rank order, then ``<|startoftext|>`` and ``<|endoftext|>``. (The word-list tokenizer of
    :mod:`text3d.teacher.tokenizer` lists the bytes in byte order instead; its ids are its own.)"""
    from text3d.teacher.tokenizer import BOS_TOKEN, END_OF_WORD, EOS_TOKEN, bytes_to_unicode

    table = bytes_to_unicode()
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    order = printable + [b for b in range(256) if b not in printable]
    base = [table[b] for b in order]
    tokens = base + [b + END_OF_WORD for b in base] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def write_clip_bpe_tokenizer(out_dir: str | os.PathLike, bpe_path: str | os.PathLike, pad_token: str = "<|endoftext|>",
                             n_merges: int = CLIP_MERGES) -> Path:
    """Write a transformers CLIPTokenizer folder (vocab.json, merges.txt, configs) from CLIP's merges file.

    The vocabulary is :func:`clip_bpe_vocab`, so token ids are CLIP's own ("a photo of a cat" is
    49406 320 1125 539 320 2368 49407)."""
    from text3d.teacher.tokenizer import MODEL_MAX_LENGTH, write_clip_tokenizer

    merges = read_clip_merges(bpe_path, n_merges)
    return write_clip_tokenizer(out_dir, clip_bpe_vocab(merges), merges, MODEL_MAX_LENGTH, pad_token)


# ------------------------------------------------------------------------------------------------ the folder
def _write_folder(folder: Path, shape: SDShape, width: str, seed: int, bpe, tokenizer_words) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from text3d.teacher.loader import model_index
    from text3d.teacher.tokenizer import build_clip_tokenizer

    if tokenizer_words is None:
        write_clip_bpe_tokenizer(folder / "tokenizer", find_clip_bpe(bpe), pad_token=shape.pad_token)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    else:  # tests without the merges file: the word-list tokenizer of the tiny teacher
        tokenizer = build_clip_tokenizer(folder / "tokenizer", tokenizer_words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_config(shape, width))
        unet.save_pretrained(folder / "unet")
        del unet  # one network in memory at a time
        torch.manual_seed(seed + 1)
        AutoencoderKL(**vae_config(shape, width)).save_pretrained(folder / "vae")
        torch.manual_seed(seed + 2)
        config = CLIPTextConfig(**text_config(shape, width, vocab_size=len(tokenizer), bos=tokenizer.bos_token_id,
                                              eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id))
        config.architectures = ["CLIPTextModel"]
        CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    _scheduler(shape).save_pretrained(folder / "scheduler")
    index = model_index(shape.scheduler)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    card = {"kind": "text3d random Stable-Diffusion-shaped teacher", "shape": shape.name, "width": width,
            "seed": seed, "prediction_type": shape.prediction_type, "image_size": shape.sample_size * 8,
            "note": "random weights: shapes, memory, speed and code paths are real, the images are not"}
    (folder / "text3d_shape.json").write_text(json.dumps(card, indent=2) + "\n")


def build_sd_teacher(out_dir: str | os.PathLike, shape: str = "sd21-base", width: str = "full", seed: int = 0,
                     bpe: str | os.PathLike | None = None, tokenizer_words=None, overwrite: bool = False) -> Path:
    """Write a random ``shape`` teacher (sd15 | sd21-base | sd21) into ``out_dir``, atomically.

    ``width``: ``full`` (the published size) or ``tiny``; ``bpe``: CLIP's merges file (default: found in an
    installed package, :func:`find_clip_bpe`); ``tokenizer_words``: use the word-list tokenizer of the tiny
    teacher instead of CLIP's BPE (tests on machines without the merges file). An existing non-empty
    ``out_dir`` is an error unless ``overwrite``."""
    from text3d.runtime.atomic import atomic_dir
    from text3d.teacher.loader import quiet_hf

    spec = get_shape(shape)
    if width not in WIDTHS:
        raise UserError(f"unknown width {width!r}: expected full or tiny")
    if tokenizer_words is None:
        find_clip_bpe(bpe)  # fail before any work
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; choose another folder or pass --force")
    with atomic_dir(out) as tmp, quiet_hf():
        _write_folder(tmp, spec, width, seed, bpe, tokenizer_words)
    return out
