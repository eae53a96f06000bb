"""Turn a trained renderer into files: export mesh formats, preview grid, turntable video, run summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from text3d.cameras import orbit_cameras
from text3d.generate.config import RunConfig
from text3d.export import export_textured_mesh, write_turntable
from text3d.generate.preview import render_views, save_run_preview
from text3d.renderers.protocol import Renderer
from text3d.runtime.run_folder import SUMMARY_NAME
from text3d.runtime.atomic import atomic_write_text


def turntable_frames(renderer: Renderer, cfg: RunConfig, device: torch.device,
                     mesh_path: Path | None = None) -> list[np.ndarray]:
    """``export.video_frames`` orbit views (lambertian, light at the camera) as uint8 [H, W, 3] frames: of the
    exported mesh at ``mesh_path`` when given (the asset the user downloads, rasterised: 48 frames at 128 px take
    about 1.6 s on 2 CPU cores against about 11 s volume-rendering the NeRF), else of ``renderer``."""
    cams = orbit_cameras(cfg.camera, cfg.export.video_frames)
    res = cfg.export.video_resolution
    if mesh_path is None:
        images = render_views(renderer, cams, res, device, shading="lambertian")["rgb"]
    else:
        from text3d.renderers.mesh import MeshAsset, render_mesh

        asset = MeshAsset.load(mesh_path).to(device)
        with torch.no_grad():
            images = torch.cat([render_mesh(asset, cams[i:i + 8].to(device), res, res, shading="lambertian")["rgb"].cpu()
                                for i in range(0, len(cams), 8)])
    return [(img.permute(1, 2, 0).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8) for img in images]


def particle_dir(run_dir: Path, index: int, count: int) -> Path:
    """Where particle ``index`` of ``count`` is exported: the run folder itself for a single asset."""
    return Path(run_dir) if count == 1 else Path(run_dir) / f"particle_{index}"


def export_particle(renderer: Renderer, cfg: RunConfig, device: torch.device, out_dir: Path,
                    formats: Sequence[str] = ("obj", "glb"), video: bool = True) -> dict[str, object]:
    """Mesh files (and the turntable video) of one trained renderer in ``out_dir``: its
    :meth:`~text3d.renderers.protocol.Renderer.export_surface` (a NeRF's marching-cubes mesh, a mesh stage's
    own surface; either way pieces smaller than ``export.min_component_fraction`` of the largest are
    dropped), with its colour baked into a UV atlas."""
    renderer.eval()
    begin = time.perf_counter()
    with torch.no_grad():
        surface = renderer.export_surface(cfg.export)
        extracted = time.perf_counter()
        files: dict[str, object] = dict(export_textured_mesh(surface.mesh, surface.colour, out_dir, cfg.run_name,
                                                             cfg.export, formats=tuple(formats), bound=cfg.nerf.bound))
    seconds = {"surface": round(extracted - begin, 2), **files["seconds"]}
    if video:
        start = time.perf_counter()
        mesh_path = files.get("glb") or files.get("obj")
        frames = turntable_frames(renderer, cfg, device, Path(mesh_path) if mesh_path else None)
        files["video"] = write_turntable(frames, out_dir / f"{cfg.run_name}_turntable", cfg.export.video_fps)
        seconds["video"] = round(time.perf_counter() - start, 2)
    files["seconds"] = seconds  # the export's time split (surface, unwrap, bake, write, video), in seconds
    return files


def export_run(particles: Renderer | Sequence[Renderer], cfg: RunConfig, device: torch.device, run_dir: Path,
               formats: Sequence[str] = ("obj", "glb"), video: bool = True) -> dict[str, object]:
    """Export every particle (``particle_i/`` when there are several) and a preview grid that shows
    them side by side; returns what was written (per particle under ``particle_i`` keys)."""
    if not isinstance(particles, (list, tuple)):
        particles = [particles]
    run_dir = Path(run_dir)
    if len(particles) == 1:
        files = export_particle(particles[0], cfg, device, run_dir, formats, video)
        seconds = files.pop("seconds")
    else:
        files = {f"particle_{i}": export_particle(r, cfg, device, particle_dir(run_dir, i, len(particles)), formats,
                                                   video) for i, r in enumerate(particles)}
        seconds = {key: particle.pop("seconds") for key, particle in files.items()}
    start = time.perf_counter()
    files["preview"] = save_run_preview(list(particles), cfg, device, run_dir / "preview.png")
    seconds["preview"] = round(time.perf_counter() - start, 2)
    files["seconds"] = seconds  # the time split, per particle under particle_i when there are several
    return files


def export_stage(particles: Sequence[Renderer], cfg: RunConfig, device: torch.device, run_dir: Path,
                 stage: str) -> dict[str, object]:
    """The .glb of each particle of a stage that a later stage continues, in ``stages/<stage>/`` (the run page
    shows it in a viewer of its own); no video."""
    out = Path(run_dir) / "stages" / stage
    return {f"particle_{i}": export_particle(r, cfg, device, particle_dir(out, i, len(particles)), ("glb",), False)
            for i, r in enumerate(particles)}


def _relative(files: dict, run_dir: Path) -> dict:
    out = {}
    for k, v in files.items():
        if isinstance(v, dict):
            out[k] = _relative(v, run_dir)
        elif isinstance(v, (str, Path)):
            path = Path(v)
            out[k] = str(path.relative_to(run_dir)) if path.is_absolute() and path.is_relative_to(run_dir) else path.name
        else:
            out[k] = v
    return out


def write_summary(run_dir: Path, cfg: RunConfig, step: int, seconds: float, files: dict) -> Path:
    files = dict(files)
    export_seconds = files.pop("seconds", {})  # export_run's time split
    summary = {"prompt": cfg.prompt, "guidance": cfg.guidance, "seed": cfg.seed, "steps": step,
               "train_seconds": round(seconds, 2), "export_seconds": export_seconds, "teacher": cfg.teacher.name_or_path,
               "particles": cfg.train.particles, "files": _relative(files, Path(run_dir))}
    return atomic_write_text(Path(run_dir) / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
