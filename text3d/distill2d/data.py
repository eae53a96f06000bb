"""Inputs of 2D distillation: prompts, real latents for DMD2's GAN, and DMD's cached regression pairs.

Prompts default to the embedded world's captions (every object and colour, plain and with each
view suffix). Real images are a toyworld dataset, a folder of images, or -- by default -- a small
set of embedded-world renders made on the spot. Regression pairs (noise, teacher DDIM sample) are
made once with a progress bar and cached in the output folder, keyed by what made them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from text3d.errors import UserError
from text3d.runtime.checkpoint import load_checkpoint, save_checkpoint
from text3d.runtime.progress import LoopProgress

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def default_prompts() -> list[str]:
    """Every embedded-world caption, plain and with each view suffix its training cameras can show (no
    "overhead view": the teacher never saw one)."""
    from text3d.cameras import reachable_view_labels
    from text3d.prompts import VIEW_SUFFIXES
    from text3d.toyworld.catalog import all_captions

    captions = all_captions()
    return captions + [c + VIEW_SUFFIXES[label] for c in captions for label in reachable_view_labels()]


def load_prompts(path: str | None) -> list[str]:
    if path is None:
        return default_prompts()
    from text3d.prompts import read_prompts_file

    return read_prompts_file(Path(path))


def _image_folder(folder: Path, resolution: int) -> tuple[torch.Tensor, list[str]]:
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no toyworld meta.json")
    images, captions = [], []
    for path in files:
        try:
            img = Image.open(path).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        except OSError as exc:
            raise UserError(f"cannot read image {path} ({exc})") from None
        images.append(torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float() / 255.0)
        caption = path.with_suffix(".txt")
        captions.append(caption.read_text().strip() if caption.is_file() else "")
    return torch.stack(images), captions


def real_images(real_data: str | None, count: int, resolution: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """([N, 3, R, R] in [0, 1], captions): a toyworld dataset (``count`` drawn), an image folder (captions from
    same-named .txt files), or ``count`` fresh embedded-world renders."""
    if real_data:
        folder = Path(real_data)
        if not folder.is_dir():
            raise UserError(f"real_data {folder} is not a folder")
        if (folder / "meta.json").is_file():
            from text3d.toyworld.dataset import ToyworldDataset

            data = ToyworldDataset.load(folder)
            n = min(len(data), count)
            idx = np.random.default_rng(seed).choice(len(data), n, replace=False)
            return data.images(idx), [str(data.arrays["captions"][i]) for i in idx]
        return _image_folder(folder, resolution)
    from text3d.toyworld.generate import render_shard

    arrays = render_shard(seed, 0, count, count, resolution=resolution)
    images = torch.from_numpy(arrays["images"]).permute(0, 3, 1, 2).float() / 255.0
    return images, [str(c) for c in arrays["captions"]]


@torch.no_grad()
def encode_images(teacher, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([teacher.encode_images(images[i:i + batch].to(teacher.device)).cpu()
                      for i in range(0, len(images), batch)])


def _key(teacher, prompts: Sequence[str], cfg_reg, seed: int) -> str:
    blob = json.dumps({"teacher": str(teacher.source), "weights": teacher.fingerprint(), "prompts": list(prompts),
                       "n": cfg_reg.pairs, "steps": cfg_reg.sampler_steps, "cfg": cfg_reg.guidance_scale, "seed": seed})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def regression_pairs(teacher, prompts: Sequence[str], cfg_reg, seed: int, cache: Path,
                     show_progress: bool = True, purpose: str = "the regression loss") -> dict:
    """{"noise", "latents", "prompts"}: ``cfg_reg.pairs`` teacher DDIM samples from fixed noise, cached in ``cache``.
    Making them is announced in one line (how many, for ``purpose``, where cached) with a progress bar."""
    from text3d.teacher.sampling import initial_latents, sample_latents

    key = _key(teacher, prompts, cfg_reg, seed)
    if cache.is_file():
        state = load_checkpoint(cache)
        if state.get("key") == key:
            return state
    n = cfg_reg.pairs
    g = torch.Generator("cpu").manual_seed(seed)
    order = torch.randint(len(prompts), (n,), generator=g).tolist()
    chosen = [prompts[i] for i in order]
    noise = initial_latents(teacher, n, g).cpu()
    latents = []
    with LoopProgress(n, description="regression pairs", enabled=show_progress) as bar:
        bar.log(f"making {n} regression pairs for {purpose} (the teacher's {cfg_reg.sampler_steps}-step DDIM "
                f"samples at CFG {cfg_reg.guidance_scale:g}), once: cached in {cache} "
                f"(regression.pairs=N sets how many)")
        for start in range(0, n, cfg_reg.batch_size):
            stop = min(n, start + cfg_reg.batch_size)

            def report(i, t, x, start=start, stop=stop):  # the samples' share of the batch after DDIM step i
                bar.update(start + (stop - start) * (i + 1) // cfg_reg.sampler_steps)

            latents.append(sample_latents(teacher, chosen[start:stop], steps=cfg_reg.sampler_steps,
                                          guidance_scale=cfg_reg.guidance_scale, latents=noise[start:stop],
                                          callback=report).cpu())
            bar.update(stop, {})
    state = {"key": key, "noise": noise, "latents": torch.cat(latents), "prompts": chosen}
    save_checkpoint(cache, state)
    return state
