"""Writing the trained teacher: a diffusers Stable Diffusion folder, its model card, a load check
through :func:`text3d.teacher.load_teacher` and a preview grid of samples.

The folder is built beside the target, checked by loading it back exactly as a real SD folder is
loaded, and only then renamed into place, so the previous teacher survives any failure.

The model card (``README.md`` of the folder) has a judge-score section between the markers
:data:`JUDGE_BEGIN` and :data:`JUDGE_END`; :func:`fill_model_card_section` replaces what lies
between them (the evaluation script's job).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from text3d.errors import UserError
from text3d.runtime.atomic import atomic_dir
from text3d.teacher.loader import save_components

JUDGE_BEGIN = "<!-- judge-scores:begin -->"
JUDGE_END = "<!-- judge-scores:end -->"
JUDGE_PLACEHOLDER = ("_Not evaluated yet. The evaluation script fills this section in (it replaces everything "
                     "between the two judge-scores markers)._")
CARD_NAME = "README.md"
SIZE_LIMIT_MB = 40.0


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _may_replace(out: Path) -> bool:
    """Only an empty folder, a teacher folder or a folder with nothing but a model card is replaced."""
    names = {p.name for p in out.iterdir()}
    return not names or (out / "model_index.json").is_file() or names <= {CARD_NAME}


def check_output_folder(out: Path) -> None:
    """Fail early (before hours of training) when ``out`` could not be replaced by the teacher."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and not _may_replace(out):
        raise UserError(f"--out {out} exists and is not a teacher folder (no model_index.json); "
                        f"choose an empty or new folder")
    parent = out.parent if out.parent.exists() else next(p for p in out.parents if p.exists())
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write into {parent}")


@torch.no_grad()
def verify_teacher(folder: Path, images: torch.Tensor, captions: Sequence[str]) -> dict:
    """Load ``folder`` with load_teacher (CPU, fp32) and run encode, decode and predict_eps on a few examples.

    Returns shapes and numbers for the model card; raises UserError if a shape is wrong or a value not finite.
    """
    from text3d.teacher import load_teacher

    teacher = load_teacher(str(folder), "cpu", dtype="fp32")
    latents = teacher.encode_images(images)
    recon = teacher.decode_latents(latents)
    n = images.shape[0]
    t = torch.linspace(50, teacher.num_train_timesteps - 50, n).long()
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    noisy = teacher.add_noise(latents, noise, t)
    cond, uncond = teacher.encode_prompts(list(captions)), teacher.encode_prompts([""] * n)
    eps = teacher.predict_eps(noisy, t, cond, uncond, guidance_scale=3.0)
    eps_cond = teacher.predict_eps(noisy, t, cond)
    expect = (n, teacher.latent_channels, teacher.latent_size, teacher.latent_size)
    if tuple(latents.shape) != expect or tuple(eps.shape) != expect or recon.shape != images.shape:
        raise UserError(f"the written teacher gives wrong shapes: latents {tuple(latents.shape)}, eps "
                        f"{tuple(eps.shape)}, images {tuple(recon.shape)} (expected latents {expect})")
    if not all(torch.isfinite(x).all() for x in (latents, recon, eps)):
        raise UserError("the written teacher gives NaN/inf values")
    return {
        "teacher": repr(teacher),
        "latent_shape": list(latents.shape[1:]),
        "text_embedding_shape": list(cond.shape[1:]),
        "latent_std": float(latents.std()),
        "recon_l1": float((recon - images).abs().mean()),
        "recon_psnr": float(-10 * torch.log10(((recon - images) ** 2).mean() + 1e-12)),
        "eps_mse_cond": float(((eps_cond - noise) ** 2).mean()),
        "eps_shape": list(eps.shape[1:]),
    }


@torch.no_grad()
def sample_images(teacher, prompts: Sequence[str], steps: int = 30, guidance: float = 4.0, seed: int = 0) -> torch.Tensor:
    """Images [N, 3, 64, 64] in [0, 1] sampled with DDIM and classifier-free guidance (a preview only)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(teacher.scheduler.config)
    scheduler.set_timesteps(steps)
    n = len(prompts)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, teacher.latent_channels, teacher.latent_size, teacher.latent_size, generator=g)
    z = z.to(teacher.device)
    cond, uncond = teacher.encode_prompts(list(prompts)), teacher.encode_prompts([""] * n)
    for t in scheduler.timesteps:
        eps = teacher.predict_eps(z, t.expand(n), cond, uncond, guidance_scale=guidance)
        z = scheduler.step(eps, t, z).prev_sample
    return teacher.decode_latents(z)


def save_grid(rows: Sequence[torch.Tensor], path: Path, scale: int = 2) -> Path:
    """Save rows of images [N, 3, H, W] in [0, 1] as one PNG (each image upscaled ``scale`` times)."""
    from PIL import Image

    from text3d.runtime.atomic import atomic_path

    grid = torch.cat([torch.cat(list(r.clamp(0, 1).cpu()), dim=2) for r in rows], dim=1)
    array = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8")
    image = Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def write_teacher(out: Path, vae, unet, text_encoder, tokenizer_dir: Path, scheduler, card_info: dict,
                  images: torch.Tensor, captions: Sequence[str]) -> dict:
    """Write the teacher folder into ``out`` atomically; returns the verification results.

    ``card_info`` is completed with the verification results and the folder size, then rendered
    into README.md.
    """
    out = Path(out).expanduser().resolve()
    check_output_folder(out)
    with atomic_dir(out) as tmp:
        save_components(tmp, vae, unet, text_encoder, tokenizer_dir, scheduler)
        checks = verify_teacher(tmp, images, captions)
        size = folder_size(tmp)
        card_info = {**card_info, "checks": checks, "size_bytes": size}
        (tmp / CARD_NAME).write_text(render_model_card(card_info))
    return {**checks, "size_bytes": size}


# ------------------------------------------------------------------ model card


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def _fmt_time(seconds: float) -> str:
    seconds = float(seconds)
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def _rate(steps: int, seconds: float) -> str:
    return f"{steps / seconds:.2f} it/s" if steps and seconds > 0 else "-"


def render_model_card(info: dict) -> str:
    """The model card (markdown) from the run summary ``info`` that :func:`train_teacher` collects."""
    d, a, s, r = info["dataset"], info["arch"], info["settings"], info["results"]
    checks, params = info.get("checks", {}), info["params"]
    size_mb = info.get("size_bytes", 0) / 2**20
    lines = [
        "# text3d embedded teacher",
        "",
        "A small latent diffusion model in the diffusers Stable Diffusion format (`unet/`, `vae/`, `text_encoder/`,",
        "`tokenizer/`, `scheduler/`), trained from scratch by `text3d teacher train` on 64x64 renders of the",
        "project's synthetic world. It is loaded by the same code as Stable Diffusion",
        "(`text3d.teacher.load_teacher`). It knows only that world: its objects, colours and views.",
        "",
        "## Data",
        "",
        f"- dataset: `{d['path']}`{' (fake shapes, not the real world)' if d.get('fake') else ''}",
        f"- {d['n']} images at 64x64, {d['captions']} distinct captions, render seed {d['seed']}",
        f"- tokenizer vocabulary: {d['words']} whole-word tokens (the world's vocabulary and every caption word)",
        "- no augmentation (a horizontal flip would swap the sides of objects with a distinct front and back)",
        "",
        "## Architecture",
        "",
        "| component | class | size | parameters |",
        "|---|---|---|---|",
        f"| vae | AutoencoderKL | 64x64x3 <-> 16x16x4, channels {list(a['vae_channels'])}, "
        f"{a['vae_layers_per_block']} ResNet/level | {_fmt_params(params['vae'])} |",
        f"| unet | UNet2DConditionModel | 16x16x4, channels {list(a['unet_channels'])}, "
        f"{a['unet_layers_per_block']} ResNet/level, cross-attention {list(a['unet_attention'])}, "
        f"{a['unet_heads']} heads | {_fmt_params(params['unet'])} |",
        f"| text_encoder | CLIPTextModel | width {a['text_width']}, {a['text_layers']} layers, "
        f"{a['text_heads']} heads, {a['text_length']} tokens | {_fmt_params(params['text_encoder'])} |",
        "| scheduler | DDPMScheduler | scaled-linear betas 0.00085..0.012, 1000 steps, epsilon | - |",
        "",
        f"Total {_fmt_params(sum(params.values()))} parameters, {size_mb:.1f} MB on disk (fp32 safetensors).",
        f"VAE scaling factor {r['scaling_factor']:.5f} = 1 / std of the VAE posterior means over the whole "
        f"dataset (their mean is {r['latent_mean']:+.4f}; no shift factor).",
        "",
        "## Training",
        "",
        f"- device: {info['device']}, {info['threads']} threads, precision {info['precision']}; speed "
        f"{_rate(r['vae_steps_run'], r['vae_time_s'])} VAE, {_rate(r['unet_steps_run'], r['unet_time_s'])} UNet",
        f"- stage 1, VAE: {r['vae_steps_run']}/{s['vae_steps']} steps of batch {s['vae_batch_size']}, AdamW lr "
        f"{s['vae_lr']:g} (warm-up, cosine to {s['min_lr_ratio']:g}x), loss L1 + {s['mse_weight']:g} x L2 (object "
        f"pixels weighted {1 + s['fg_weight']:g}x) + {s['edge_weight']:g} x edge L1 + {s['kl_weight']:g} x KL per "
        f"latent element, posterior log-variance bias initialised to -6; {_fmt_time(r['vae_time_s'])}",
        f"- stage 2, UNet + text encoder: {r['unet_steps_run']}/{s['unet_steps']} steps of batch {s['batch_size']}, "
        f"AdamW lr {s['lr']:g}, epsilon prediction, Min-SNR-{s['min_snr_gamma']:g} weights, "
        f"{s['cond_drop']:.0%} empty captions, EMA {s['ema_decay']:g} (the EMA weights ship); "
        f"{_fmt_time(r['unet_time_s'])}",
        f"- seed {s['seed']}; training time {_fmt_time(r['train_time_s'])} (both stages, all invocations); "
        f"wall time of the last invocation {_fmt_time(r['wall_time_s'])}"
        + (" (stopped early at the time budget)" if r.get("stopped_early") else ""),
        "",
        "Final losses (mean of the last 100 steps):",
        "",
        "- VAE: " + ", ".join(f"{k} {v:.4g}" for k, v in r['vae_losses'].items()),
        "- UNet: " + ", ".join(f"{k} {v:.4g}" for k, v in r['unet_losses'].items()),
    ]
    if checks:
        lines += [
            "",
            "Load check (`load_teacher`, CPU, fp32, on the first dataset images): latents "
            f"{checks['latent_shape']}, text embeddings {checks['text_embedding_shape']}, reconstruction "
            f"L1 {checks['recon_l1']:.4f} / PSNR {checks['recon_psnr']:.1f} dB, conditional epsilon MSE "
            f"{checks['eps_mse_cond']:.3f}.",
        ]
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        info.get("command") or "text3d teacher train",
        "```",
        "",
        "## Judge scores",
        "",
        JUDGE_BEGIN,
        JUDGE_PLACEHOLDER,
        JUDGE_END,
        "",
    ]
    return "\n".join(lines)


def write_model_card(path: str | os.PathLike, info: dict) -> Path:
    from text3d.runtime.atomic import atomic_write_text

    return atomic_write_text(path, render_model_card(info))


def fill_model_card_section(path: str | os.PathLike, markdown: str) -> Path:
    """Replace the judge-score section of the model card at ``path`` with ``markdown`` (atomically)."""
    from text3d.runtime.atomic import atomic_write_text

    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    begin, end = text.find(JUDGE_BEGIN), text.find(JUDGE_END)
    if begin < 0 or end < begin:
        raise UserError(f"{path} has no judge-scores section (markers {JUDGE_BEGIN} ... {JUDGE_END})")
    new = text[: begin + len(JUDGE_BEGIN)] + "\n" + markdown.strip() + "\n" + text[end:]
    return atomic_write_text(path, new)
