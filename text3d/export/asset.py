"""One call from a trained field to files: extract the mesh, decimate it, unwrap it, bake the albedo, write
OBJ/GLB (textured) and PLY (vertex colours)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import trimesh

from text3d.errors import UserError
from text3d.export.bake import bake_texture, evaluate_colors
from text3d.export.config import ExportConfig, check_export_config
from text3d.export.decimate import decimate
from text3d.export.marching import extract_mesh
from text3d.export.uv_atlas import atlas_padding, unwrap_uv_mapped
from text3d.export.writers import write_glb, write_obj, write_ply

log = logging.getLogger(__name__)

FORMATS = ("obj", "glb", "ply")
DEFAULT_FORMATS = ("obj", "glb")
_BAD_NAME_CHARS = set('/\\:*?"<>|')


def check_asset_name(name: str) -> str:
    """``name`` becomes file names (``{name}.obj``...): one path component, no whitespace, no leading dot."""
    if (not isinstance(name, str) or not name or name.startswith(".") or any(c in _BAD_NAME_CHARS for c in name)
            or any(c.isspace() or ord(c) < 32 for c in name)):
        raise UserError(f"invalid export name {name!r}: use letters, digits, '-', '_' or '.', no spaces or slashes")
    return name


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    fmts = tuple(dict.fromkeys(str(f).lower().lstrip(".") for f in formats))
    unknown = [f for f in fmts if f not in FORMATS]
    if unknown or not fmts:
        raise UserError(f"unknown export format(s) {unknown or list(formats)}: choose from {', '.join(FORMATS)}")
    return fmts


def export_textured_mesh(mesh: trimesh.Trimesh, albedo_fn: Callable[[torch.Tensor], torch.Tensor],
                         out_dir: str | os.PathLike, name: str, cfg: ExportConfig,
                         formats: Sequence[str] = DEFAULT_FORMATS, bound: Optional[float] = None,
                         device: Optional[torch.device | str] = None) -> dict:
    """Decimate ``mesh`` to ``cfg.max_faces`` (when above it), unwrap it, bake ``albedo_fn`` into a
    ``cfg.texture_size`` texture and write the requested formats (``ply``: the albedo at each vertex).

    Bake points are clamped to [-bound, bound]^3 when ``bound`` is given (marching cubes can close a
    surface up to half a voxel outside it). Normals are the welded mesh's smooth vertex normals, so
    shading shows no seams where the atlas cuts the surface.
    """
    check_export_config(cfg)
    name = check_asset_name(name)
    fmts = _check_formats(formats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def color_fn(points: torch.Tensor) -> torch.Tensor:
        if bound is not None:
            points = points.clamp(-float(bound), float(bound))
        return albedo_fn(points)

    t0 = time.perf_counter()
    if int(cfg.max_faces) > 0:
        mesh = decimate(mesh, int(cfg.max_faces))
    result: dict = {}
    if "ply" in fmts:
        colors = evaluate_colors(color_fn, np.asarray(mesh.vertices, dtype=np.float32), device=device)
        result["ply"] = write_ply(out_dir / f"{name}.ply", mesh.vertices, mesh.faces,
                                  np.clip(colors * 255.0 + 0.5, 0, 255).astype(np.uint8))
        if fmts == ("ply",):
            result.update(faces=int(len(mesh.faces)), vertices=int(len(mesh.vertices)),
                          seconds={"write": round(time.perf_counter() - t0, 2)})  # decimation, colours, the .ply
            return result
    uv = unwrap_uv_mapped(mesh, int(cfg.texture_size), atlas_padding(int(cfg.seam_padding)))
    normals = np.asarray(mesh.vertex_normals, dtype=np.float32)[uv.vmapping]
    t1 = time.perf_counter()

    texture = bake_texture(uv.vertices, uv.faces, uv.uvs, color_fn, int(cfg.texture_size), int(cfg.seam_padding),
                           device=device)
    t2 = time.perf_counter()

    if "obj" in fmts:
        result.update(write_obj(out_dir, name, uv.vertices, uv.faces, uv.uvs, texture, normals))
    if "glb" in fmts:
        result["glb"] = write_glb(out_dir / f"{name}.glb", uv.vertices, uv.faces, uv.uvs, texture, normals, name=name)
    t3 = time.perf_counter()
    result["faces"] = int(len(uv.faces))
    result["vertices"] = int(len(uv.vertices))
    result["seconds"] = {"unwrap": round(t1 - t0, 2), "bake": round(t2 - t1, 2), "write": round(t3 - t2, 2)}
    log.info("export: %d faces, %d vertices; decimate + unwrap %.1fs, bake %.1fs, write %.1fs", result["faces"],
             result["vertices"], t1 - t0, t2 - t1, t3 - t2)
    return result


def export_asset(density_fn: Callable[[torch.Tensor], torch.Tensor],
                 albedo_fn: Callable[[torch.Tensor], torch.Tensor], bound: float, out_dir: str | os.PathLike,
                 name: str, cfg: ExportConfig, formats: Sequence[str] = DEFAULT_FORMATS,
                 device: Optional[torch.device | str] = None) -> dict:
    """Density + albedo fields -> ``out_dir/{name}.obj`` + ``{name}.mtl`` + ``{name}_albedo.png``, ``{name}.glb``
    and/or ``{name}.ply``.

    ``density_fn`` and ``albedo_fn`` take world points torch[N, 3] (N <= 65536, no grad) and return
    torch[N] densities and torch[N, 3] colours in [0, 1]. Every file is written atomically. Returns
    ``{"obj", "mtl", "texture", "glb", "ply": Path (those written), "faces": int, "vertices": int, "seconds":
    {"unwrap", "bake", "write"}: float}`` (a .ply alone: ``"seconds": {"write"}``); the counts
    are those in the files (seam vertices counted once per chart).
    """
    check_export_config(cfg)
    check_asset_name(name)
    _check_formats(formats)
    t0 = time.perf_counter()
    mesh = extract_mesh(density_fn, bound, cfg, device=device)
    log.info("export: extracted %d faces in %.1fs (iso-level %.4g)", len(mesh.faces), time.perf_counter() - t0,
             mesh.metadata.get("iso_level", float("nan")))
    return export_textured_mesh(mesh, albedo_fn, out_dir, name, cfg, formats, bound=bound, device=device)
