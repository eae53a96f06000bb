"""Training data of the embedded teacher: a toyworld dataset (rendered on demand), the world's
vocabulary, caption token ids, a deterministic batch order, and a fake dataset of flat coloured
shapes for tests and smoke runs while the real world is not available.

No augmentation is applied anywhere: a horizontal flip would swap the left and right sides of
objects whose front and back differ, and the views are part of the captions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from text3d.errors import UserError
from text3d.toyworld.dataset import META_NAME, ToyworldDataset, shard_name, write_meta, write_shard


# ------------------------------------------------------------------ vocabulary


def caption_pieces(captions: Iterable[str]) -> set[str]:
    """The distinct CLIP pre-tokenizer pieces (words, punctuation runs) of some captions."""
    from text3d.teacher.tokenizer import split_pieces

    return {p for c in set(map(str, captions)) for p in split_pieces(c)}


def world_vocabulary(captions: Iterable[str] = ()) -> list[str]:
    """The words the teacher's tokenizer keeps whole: the world's vocabulary and every caption piece.

    The world's list is ``text3d.toyworld.catalog.vocabulary()``; the caption pieces are always added,
    so every caption word is one token even if the catalog forgets one (a fake or older dataset).
    """
    from text3d.toyworld import catalog

    words = {str(w) for w in catalog.vocabulary()} | caption_pieces(captions)
    return sorted(w for w in words if w.strip())


# ------------------------------------------------------------------ datasets


def render_workers() -> int:
    """Processes for rendering a dataset: one per CPU core available, at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores))


def render_toyworld(folder: Path, n: int, seed: int, progress: bool = True) -> Path:
    """Render ``n`` examples of the synthetic world into ``folder`` (``text3d toyworld render``'s renderer)."""
    from text3d.toyworld.generate import render_dataset

    return render_dataset(folder, n, seed=seed, progress=progress, workers=render_workers())


def load_dataset(folder: str | Path, render: int | None = None, seed: int = 0,
                 progress: bool = True) -> ToyworldDataset:
    """Load the toyworld dataset in ``folder``; render ``render`` examples there first if it has no meta.json."""
    folder = Path(folder).expanduser()
    if not (folder / META_NAME).is_file():
        if not render:
            raise UserError(f"{folder} is not a toyworld dataset (no {META_NAME}); render one with --render N")
        render_toyworld(folder, int(render), seed, progress=progress)
    data = ToyworldDataset.load(folder)
    if len(data) == 0:
        raise UserError(f"toyworld dataset {folder} has no examples")
    shape = data.arrays["images"].shape
    if len(shape) != 4 or shape[1:] != (64, 64, 3):
        raise UserError(f"toyworld dataset {folder} has images of shape {shape[1:]}; the teacher trains on 64x64x3")
    return data


def caption_table(captions: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(distinct captions in first-seen order, index of each example's caption in that list)."""
    distinct = list(dict.fromkeys(map(str, captions)))
    where = {c: i for i, c in enumerate(distinct)}
    return distinct, np.asarray([where[str(c)] for c in captions], dtype=np.int64)


def tokenize(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Token ids [N, model_max_length] padded and truncated exactly as the Teacher pads prompts."""
    out = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return out["input_ids"]


class BatchOrder:
    """Which examples step ``s`` (from 1) trains on: consecutive slices of per-epoch permutations.

    The order depends only on (seed, n, batch size, step), never on earlier steps, so a resumed run
    sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        start = (step - 1) * self.batch_size
        parts, pos, left = [], start, self.batch_size
        while left > 0:
            epoch, offset = divmod(pos, self.n)
            take = min(left, self.n - offset)
            parts.append(self._permutation(epoch)[offset: offset + take])
            pos, left = pos + take, left - take
        return torch.cat(parts)


def images_to_model(images_u8: np.ndarray, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [N, 64, 64, 3] rows -> float [B, 3, 64, 64] in [-1, 1] on ``device``."""
    batch = torch.from_numpy(np.ascontiguousarray(images_u8[indices.numpy()]))
    return batch.to(device).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


# ------------------------------------------------------------------ fake world

FAKE_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
                "purple": (140, 50, 180), "orange": (240, 140, 30)}
FAKE_SHAPES = ("square", "circle", "triangle")
FAKE_VIEWS = ("front", "side", "back", "overhead")


def _fake_image(rng: np.random.Generator, shape: str, colour: tuple[int, int, int], view: str, res: int) -> np.ndarray:
    """A flat shape on a light background; the view changes it (front: a white dot on the left,
    back: the dot on the right, side: squeezed horizontally, overhead: smaller, seen from above)."""
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
    cx, cy = res / 2 + rng.uniform(-4, 4), res / 2 + rng.uniform(-4, 4)
    r = res * rng.uniform(0.22, 0.3) * (0.7 if view == "overhead" else 1.0)
    sx = 0.5 if view == "side" else 1.0
    dx, dy = (xx - cx) / sx, yy - cy
    if shape == "square":
        mask = (np.abs(dx) < r) & (np.abs(dy) < r)
    elif shape == "circle":
        mask = dx**2 + dy**2 < r**2
    else:
        mask = (dy < r * 0.8) & (dy > -r) & (np.abs(dx) < (dy + r) * 0.6)
    background = np.array([235, 235, 235], np.float32) + rng.uniform(-10, 10)
    img = np.broadcast_to(background, (res, res, 3)).copy()
    shade = (1.0 - 0.25 * (yy - cy + r) / (2 * r)).clip(0.7, 1.0)[..., None]  # a little vertical shading
    img[mask] = (np.array(colour, np.float32) * shade)[mask]
    if view in ("front", "back"):
        px = cx + (-0.45 if view == "front" else 0.45) * r
        dot = (xx - px) ** 2 + (yy - cy) ** 2 < (0.22 * r) ** 2
        img[dot & mask] = 255.0
    return img.clip(0, 255).astype(np.uint8)


def write_fake_dataset(folder: str | Path, n: int = 256, seed: int = 0, resolution: int = 64,
                       shard_size: int = 1000) -> Path:
    """A toyworld-format dataset of ``n`` coloured squares/circles/triangles with captions like
    ``"a red square, front view"`` (one in five without the view)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = list(FAKE_COLOURS)
    shards = []
    for start in range(0, n, shard_size):
        count = min(shard_size, n - start)
        arrays: dict[str, list] = {k: [] for k in ("images", "captions", "object", "colour", "view", "elevation",
                                                   "azimuth", "radius", "fovy")}
        for _ in range(count):
            o, c, v = rng.integers(len(FAKE_SHAPES)), rng.integers(len(colours)), rng.integers(len(FAKE_VIEWS))
            arrays["images"].append(_fake_image(rng, FAKE_SHAPES[o], FAKE_COLOURS[colours[c]], FAKE_VIEWS[v],
                                                resolution))
            caption = f"a {colours[c]} {FAKE_SHAPES[o]}"
            arrays["captions"].append(caption if rng.random() < 0.2 else f"{caption}, {FAKE_VIEWS[v]} view")
            arrays["object"].append(o)
            arrays["colour"].append(c)
            arrays["view"].append(v)
            arrays["elevation"].append(80.0 if FAKE_VIEWS[v] == "overhead" else 15.0)
            arrays["azimuth"].append({"front": 0.0, "side": 90.0, "back": 180.0, "overhead": 0.0}[FAKE_VIEWS[v]])
            arrays["radius"].append(3.0)
            arrays["fovy"].append(40.0)
        name = shard_name(len(shards))
        write_shard(folder / name, {
            "images": np.stack(arrays["images"]), "captions": np.asarray(arrays["captions"]),
            "object": np.asarray(arrays["object"], np.int16), "colour": np.asarray(arrays["colour"], np.int16),
            "view": np.asarray(arrays["view"], np.int8),
            **{k: np.asarray(arrays[k], np.float32) for k in ("elevation", "azimuth", "radius", "fovy")}})
        shards.append(name)
    write_meta(folder, {"seed": seed, "n": n, "resolution": resolution, "objects": list(FAKE_SHAPES),
                        "colours": colours, "view_labels": list(FAKE_VIEWS), "shards": shards, "fake": True,
                        "front_back_objects": list(FAKE_SHAPES)})  # the dot shows front from back on every shape
    return folder
