"""The on-disk format of a toyworld dataset, and its reader.

A dataset folder holds ``meta.json`` and shards ``shard_00000.npz``, ``shard_00001.npz``, ...
Each shard has, for its ``n`` examples:

    images     uint8   [n, R, R, 3]   RGB, row 0 at the top
    captions   str     [n]            e.g. "a red cube, front view" or "a red cube"
    object     int16   [n]            index into meta["objects"]
    colour     int16   [n]            index into meta["colours"]
    view       int8    [n]            index into meta["view_labels"] (front, side, back, overhead)
    elevation, azimuth, radius, fovy  float32 [n]   the camera (degrees), text3d.cameras convention

``meta.json``: {"format": 1, "seed", "n", "resolution", "objects", "colours", "view_labels", "shards"}.
Shards are written atomically, so a killed render leaves only complete shards; the meta file is
written last.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from text3d.errors import UserError
from text3d.runtime.atomic import atomic_write_bytes, atomic_write_text

FORMAT = 1
META_NAME = "meta.json"
ARRAY_KEYS = ("images", "captions", "object", "colour", "view", "elevation", "azimuth", "radius", "fovy")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npz"


def write_shard(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    missing = [k for k in ARRAY_KEYS if k not in arrays]
    if missing:
        raise ValueError(f"shard is missing {missing}")
    n = len(arrays["images"])
    if any(len(arrays[k]) != n for k in ARRAY_KEYS):
        raise ValueError("shard arrays have different lengths")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(arrays[k]) for k in ARRAY_KEYS})
    return atomic_write_bytes(path, buffer.getvalue())


def write_meta(folder: Path, meta: dict) -> Path:
    return atomic_write_text(Path(folder) / META_NAME, json.dumps({"format": FORMAT, **meta}, indent=2) + "\n")


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META_NAME
    if not path.is_file():
        raise UserError(f"{folder} is not a toyworld dataset (no {META_NAME}); make one with text3d toyworld render")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} has format {meta.get('format')}, expected {FORMAT}")
    return meta


def load_arrays(folder: Path) -> dict[str, np.ndarray]:
    """Every shard of a dataset concatenated into one dict of arrays."""
    folder = Path(folder)
    meta = read_meta(folder)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ARRAY_KEYS}
    for name in meta["shards"]:
        try:
            with np.load(folder / name, allow_pickle=False) as shard:
                for key in ARRAY_KEYS:
                    parts[key].append(shard[key])
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"dataset shard {folder / name} is missing or corrupt ({exc})") from None
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


@dataclass
class ToyworldDataset(torch.utils.data.Dataset):
    """A loaded dataset; items are dicts with ``image`` float [3, R, R] in [0, 1] and the labels."""

    arrays: dict[str, np.ndarray]
    meta: dict

    @classmethod
    def load(cls, folder: str | Path) -> "ToyworldDataset":
        return cls(load_arrays(Path(folder)), read_meta(Path(folder)))

    def __len__(self) -> int:
        return len(self.arrays["images"])

    def __getitem__(self, i: int) -> dict:
        a = self.arrays
        return {"image": torch.from_numpy(a["images"][i]).permute(2, 0, 1).float() / 255.0,
                "caption": str(a["captions"][i]), "object": int(a["object"][i]), "colour": int(a["colour"][i]),
                "view": int(a["view"][i])}

    def images(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """float [N, 3, R, R] in [0, 1]."""
        imgs = self.arrays["images"] if indices is None else self.arrays["images"][np.asarray(indices)]
        return torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float() / 255.0

    @property
    def objects(self) -> list[str]:
        return list(self.meta["objects"])

    @property
    def colours(self) -> list[str]:
        return list(self.meta["colours"])

    @property
    def view_labels(self) -> list[str]:
        return list(self.meta["view_labels"])
