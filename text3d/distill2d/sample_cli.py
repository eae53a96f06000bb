"""`text3d sample`: images from a teacher by DDIM with classifier-free guidance, for inspection and eval.

The output folder gets ``grid.png`` (all samples tiled), ``images/00000.png ...`` and
``prompts.json`` ({"images": [{"file", "prompt", "index"}], "model", "steps", "guidance_scale",
"seed", ...}), the input of ``text3d eval images``. The starting noise of every image is drawn up
front from one generator seeded with ``--seed``, so a seed fixes the output whatever the batch size.
Only the entries this command makes are replaced in an existing folder; each file is written atomically
and ``prompts.json`` last.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from text3d.errors import UserError

OUTPUT_ENTRIES = ("grid.png", "images", "prompts.json", "scores.json")  # scores.json: stale once resampled
GRID_CELL_MAX = 256  # grid cells are downscaled to at most this many pixels


def _check_out(out: Path) -> Path:
    out = Path(os.path.expanduser(os.fspath(out)))
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if (out / "images").exists() and not (out / "prompts.json").is_file():
        raise UserError(f"--out {out} already has an images/ folder that text3d sample did not write; "
                        f"choose another folder")
    return out


def grid_columns(n_prompts: int, n_per_prompt: int) -> int:
    """One row per prompt when several prompts have several images each (up to 16 a row), else a
    near-square grid (one image per prompt: the prompts in reading order, at most 24 a row)."""
    if n_prompts > 1 and n_per_prompt > 1:
        return min(n_per_prompt, 16)
    return max(1, min(24, math.ceil(math.sqrt(n_prompts * n_per_prompt))))


def save_grid(images, columns: int, path: Path) -> Path:
    """Tile [N, 3, H, W] images in [0, 1] row by row (white padding) into one PNG, atomically."""
    import torch
    import torch.nn.functional as F

    from text3d.runtime.preview import save_preview

    size = images.shape[-1]
    if size > GRID_CELL_MAX:
        images = F.interpolate(images, size=(GRID_CELL_MAX, GRID_CELL_MAX), mode="bilinear", antialias=True,
                               align_corners=False)
    pad = (-len(images)) % columns
    if pad:
        images = torch.cat([images, torch.ones((pad, *images.shape[1:]), dtype=images.dtype)])
    rows = [images[i:i + columns] for i in range(0, len(images), columns)]
    return save_preview(rows, path)


def view_cameras(prompts):
    """[B, 16] camera features of each prompt's view suffix (zeros for a plain prompt)."""
    from text3d.cameras import view_features
    from text3d.prompts import split_view_suffix

    return view_features([split_view_suffix(p)[1] for p in prompts])


def _save_png(image, path: Path) -> None:
    import numpy as np
    from PIL import Image

    from text3d.runtime.atomic import atomic_path

    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def run_sample(prompts: list[str], out: Path, model: Optional[str] = None, steps: Optional[int] = None, n: int = 16,
               guidance_scale: Optional[float] = None, seed: int = 0, batch_size: int = 16, device: str = "auto",
               teacher=None, progress: bool = True, sampler: Optional[str] = None, view_camera: bool = False) -> dict:
    """Sample ``n`` images per prompt into ``out``; returns the prompts.json record. ``view_camera``: a view-aware
    teacher also sees each prompt's view-suffix camera (:func:`view_cameras`).

    ``teacher`` may be an already loaded Teacher (then ``model`` and ``device`` are ignored). A
    distilled student folder (with ``student.json``) is sampled with its own timesteps and sampler:
    ``steps`` (default all of them) takes the first ``steps`` of its timesteps, and the guidance
    scale defaults to the student's (1: its CFG is distilled in). A teacher defaults to 50 DDIM steps
    at guidance scale 7.5.
    """
    from text3d.distill2d.student import read_student_card
    import torch

    from text3d.teacher import load_teacher
    from text3d.teacher.sampling import initial_latents, sample_images
    from text3d.runtime.progress import LoopProgress
    from text3d.runtime.atomic import atomic_write_text

    from text3d.teacher.sampling import SAMPLERS

    if n < 1:
        raise UserError(f"-n must be at least 1, got {n}")
    if sampler is not None and sampler not in SAMPLERS:
        raise UserError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    out = _check_out(out)
    if teacher is None:
        teacher = load_teacher(model, device)
    card = read_student_card(teacher.source if teacher.source and os.path.isdir(str(teacher.source)) else None)
    timesteps = None
    if card is not None:
        student_steps = card.get("timesteps")
        card_sampler = str(card.get("sampler", "ddim"))
        if student_steps:
            steps = len(student_steps) if steps is None else steps
            if card_sampler == "renoise" and not 1 <= steps <= len(student_steps):
                raise UserError(f"this student samples in 1 to {len(student_steps)} step(s) (timesteps "
                                f"{student_steps}), got --steps {steps}")
            if card_sampler != "renoise" and steps != len(student_steps):
                raise UserError(f"this student was distilled for exactly {len(student_steps)} step(s), got --steps {steps}")
            timesteps = student_steps[:steps]
        sampler = sampler or card_sampler
        guidance_scale = float(card.get("guidance_scale", 1.0)) if guidance_scale is None else guidance_scale
    sampler = sampler or "ddim"
    steps = 50 if steps is None else steps
    guidance_scale = 7.5 if guidance_scale is None else guidance_scale
    if not math.isfinite(guidance_scale):
        raise UserError(f"--guidance-scale must be a finite number, got {guidance_scale}")
    if not 1 <= steps <= teacher.num_train_timesteps:
        raise UserError(f"--steps must be between 1 and {teacher.num_train_timesteps}, got {steps}")

    if view_camera and not teacher.camera_dim:
        raise UserError(f"--view-camera needs a view-aware teacher (a UNet with a camera input); {teacher.source} "
                        "has none")
    items = [p for p in prompts for _ in range(n)]  # prompt-major: n images of prompt 0, then prompt 1...
    generator = torch.Generator("cpu").manual_seed(int(seed))
    noise = initial_latents(teacher, len(items), generator).cpu()  # all starting noise up front
    batches = range(0, len(items), batch_size)
    images = []
    started = time.perf_counter()
    with LoopProgress(total=len(batches) * steps, description="sampling", enabled=progress) as bar:
        for b, start in enumerate(batches):
            chunk = items[start:start + batch_size]
            done = b * steps

            def report(i, t, x, done=done):
                bar.update(done + i + 1, {"batch": b + 1})

            cameras = view_cameras(chunk) if view_camera else None
            with teacher.viewing(cameras):
                imgs = sample_images(teacher, chunk, steps=steps, guidance_scale=guidance_scale, generator=generator,
                                     latents=noise[start:start + len(chunk)], callback=report, timesteps=timesteps,
                                     sampler=sampler)
            images.append(imgs.cpu())
    images = torch.cat(images)
    seconds = time.perf_counter() - started

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".sample-", dir=out))
    try:
        records = []
        for i, (prompt, image) in enumerate(zip(items, images)):
            name = f"images/{i:05d}.png"
            _save_png(image, staging / name)
            records.append({"file": name, "prompt": prompt, "index": i % n})
        save_grid(images, grid_columns(len(prompts), n), staging / "grid.png")
        record = {"images": records, "model": teacher.source, "steps": int(steps),
                  "guidance_scale": float(guidance_scale), "seed": int(seed), "n_per_prompt": int(n),
                  "prompts": list(prompts), "sampler": sampler, "eta": 0.0,
                  "timestep_spacing": "trailing" if timesteps is None else "student", "timesteps": timesteps,
                  "view_camera": bool(view_camera),
                  "image_size": int(images.shape[-1]), "seconds": round(seconds, 3),
                  "images_per_second": round(len(items) / max(seconds, 1e-9), 3), "batch_size": int(batch_size)}
        # swap in: remove our old entries, move the new ones in, prompts.json last
        (out / "prompts.json").unlink(missing_ok=True)
        (out / "scores.json").unlink(missing_ok=True)
        if (out / "images").exists():
            shutil.rmtree(out / "images")
        os.replace(staging / "images", out / "images")
        os.replace(staging / "grid.png", out / "grid.png")
        atomic_write_text(out / "prompts.json", json.dumps(record, indent=2) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def sample(
    prompt: Optional[str] = typer.Argument(None, help="What to draw, e.g. \"a red cube, front view\"."),
    model: Optional[Path] = typer.Option(None, "--model", help="Teacher: diffusers folder or hub id "
                                         "(default: the project's teacher)."),
    steps: Optional[int] = typer.Option(None, help="Sampling steps: DDIM steps for a teacher (default 50; 1 = one-step "
                                        "x0 prediction), the first N of a distilled student's timesteps (default all)."),
    n: int = typer.Option(16, "-n", "--n", help="Images per prompt."),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help="Classifier-free guidance scale "
                                                   "(default 7.5; a distilled student's own, usually 1)."),
    seed: int = typer.Option(0, help="Random seed; a seed fixes the output."),
    out: Path = typer.Option(..., "--out", help="Output folder (grid.png, images/, prompts.json)."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line; "
                                                "n images per prompt."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images sampled together."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    sampler: Optional[str] = typer.Option(None, help="ddim | renoise | stochastic (default: a student's own, else "
                                          "ddim)."),
    view_camera: bool = typer.Option(False, "--view-camera", help="A view-aware teacher also gets the camera of each "
                                     "prompt's view suffix (front, side, back, overhead; none for a plain prompt)."),
):
    """Sample images from the teacher (DDIM + classifier-free guidance) into a folder."""
    from text3d.prompts import read_prompts_file, validate_prompt

    if prompt is not None and prompts_file is not None:
        raise UserError("give either a PROMPT or --prompts FILE, not both")
    if prompts_file is not None:
        prompts = read_prompts_file(prompts_file)
    elif prompt is None or not prompt.strip():
        raise UserError("the prompt is empty: give a text description, e.g. text3d sample \"a red cube\" --out DIR "
                        "(or --prompts FILE)")
    else:
        prompts = [validate_prompt(prompt)]
    record = run_sample(prompts, out, model=None if model is None else os.fspath(model), steps=steps, n=n,
                        guidance_scale=guidance_scale, seed=seed, batch_size=batch_size, device=device, sampler=sampler,
                        view_camera=view_camera)
    typer.echo(f"wrote {len(record['images'])} images ({len(prompts)} prompt(s) x {n}) to {out}")
