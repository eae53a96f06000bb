"""Checkpoints: written atomically, read with a one-line error when missing or corrupt."""

from __future__ import annotations

from pathlib import Path

import torch

from text3d.errors import CheckpointError
from text3d.runtime.atomic import atomic_path

FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """torch.save ``state`` (plus a format version) to ``path`` via a temporary file and rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({reason})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a text3d checkpoint of format {FORMAT_VERSION}")
    return state


def load_module_state(module, state: dict, key: str) -> None:
    """Load ``state[key]`` into ``module``; a missing key or a shape mismatch is a CheckpointError."""
    try:
        module.load_state_dict(state[key])
    except (KeyError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint does not match this run's {key} ({reason})") from None
