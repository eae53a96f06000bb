"""Preview grids of 3D assets: orbit views of each particle (albedo, shaded, normals), tiled by
:func:`text3d.runtime.preview.save_preview`."""

from __future__ import annotations

from pathlib import Path

import torch

from text3d.cameras import Cameras, orbit_cameras
from text3d.runtime.preview import save_preview


def render_views(renderer, cameras: Cameras, resolution: int, device: torch.device, shading: str = "lambertian",
                 chunk: int = 4) -> dict[str, torch.Tensor]:
    """Eval-mode renders (no stratification, light at each camera), detached and on the CPU."""
    was_training = renderer.training
    renderer.eval()
    pieces: dict[str, list[torch.Tensor]] = {}
    try:
        for i in range(0, len(cameras), chunk):
            out = renderer(cameras[i:i + chunk].to(device), resolution, resolution, shading=shading, want_normals=True)
            for key in ("rgb", "normal", "opacity"):
                if key in out:
                    pieces.setdefault(key, []).append(out[key].detach().cpu())
    finally:
        renderer.train(was_training)
    return {k: torch.cat(v) for k, v in pieces.items()}


def preview_rows(renderer, cfg, device: torch.device) -> list[torch.Tensor]:
    """``cfg.train.preview_views`` orbit views of one renderer: albedo, shaded and normals rows."""
    cams = orbit_cameras(cfg.camera, cfg.train.preview_views)
    res = max(64, cfg.train.resolution)
    albedo = render_views(renderer, cams, res, device, shading="albedo")
    shaded = render_views(renderer, cams, res, device, shading="lambertian")
    rows = [albedo["rgb"], shaded["rgb"]]
    if "normal" in shaded:
        rows.append((shaded["normal"] * 0.5 + 0.5) * shaded["opacity"] + (1 - shaded["opacity"]))
    return rows


def save_run_preview(renderers, cfg, device: torch.device, path: Path) -> Path:
    """The preview grid of a renderer, or of several particles side by side (one block of columns each)."""
    if not isinstance(renderers, (list, tuple)):
        renderers = [renderers]
    per_particle = [preview_rows(r, cfg, device) for r in renderers]
    rows = [torch.cat(parts) for parts in zip(*per_particle)]
    return save_preview(rows, path)
