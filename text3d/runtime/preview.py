"""Preview grids: rows of [B, 3, H, W] images in [0, 1] tiled into one PNG, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from text3d.runtime.atomic import atomic_path


def tile(rows: Sequence[torch.Tensor]) -> np.ndarray:
    """Rows of [B, 3, H, W] tensors -> one uint8 [rows*H, B*W, 3] array."""
    strips = [torch.cat(list(r.clamp(0, 1)), dim=2) for r in rows]  # each [3, H, B*W]
    grid = torch.cat(strips, dim=1)
    return (grid.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def save_preview(rows: Sequence[torch.Tensor], path: Path) -> Path:
    with atomic_path(path) as tmp:
        Image.fromarray(tile(rows)).save(tmp, format="PNG")
    return Path(path)
