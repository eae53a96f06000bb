"""Turn a trained renderer into files: export mesh formats, preview grid, turntable video, run summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from text3d.cameras import orbit_cameras
from text3d.config import RunConfig
from text3d.export import export_asset, write_turntable
from text3d.training.preview import render_views, save_run_preview
from text3d.training.run_folder import SUMMARY_NAME
from text3d.utils.atomic import atomic_write_text

FORMATS = {"obj": ("obj",), "glb": ("glb",), "both": ("obj", "glb")}


def turntable_frames(renderer, cfg: RunConfig, device: torch.device) -> list[np.ndarray]:
    cams = orbit_cameras(cfg.camera, cfg.export.video_frames)
    images = render_views(renderer, cams, cfg.export.video_resolution, device, shading="lambertian")["rgb"]
    return [(img.permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8) for img in images]


def export_run(renderer, cfg: RunConfig, device: torch.device, run_dir: Path,
               formats: Sequence[str] = ("obj", "glb"), video: bool = True) -> dict[str, object]:
    """Write the asset files of a trained ``renderer`` into ``run_dir``; returns what was written."""
    field = renderer.field
    renderer.eval()
    with torch.no_grad():
        files: dict[str, object] = dict(export_asset(field.query_density, field.query_albedo, cfg.nerf.bound,
                                                     run_dir, cfg.run_name, cfg.export, formats=tuple(formats)))
    files["preview"] = save_run_preview(renderer, cfg, device, run_dir / "preview.png")
    if video:
        files["video"] = write_turntable(turntable_frames(renderer, cfg, device), run_dir / f"{cfg.run_name}_turntable",
                                         cfg.export.video_fps)
    return files


def write_summary(run_dir: Path, cfg: RunConfig, step: int, seconds: float, files: dict) -> Path:
    summary = {"prompt": cfg.prompt, "guidance": cfg.guidance, "seed": cfg.seed, "steps": step,
               "train_seconds": round(seconds, 2), "teacher": cfg.teacher.name_or_path,
               "files": {k: (Path(v).name if isinstance(v, (str, Path)) else v) for k, v in files.items()}}
    return atomic_write_text(Path(run_dir) / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
