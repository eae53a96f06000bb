"""Density field -> clean triangle mesh: grid sampling, iso-level choice, marching cubes, cleanup.

Grid convention: ``grid[i, j, k]`` is the density at ``(x_i, y_j, z_k)`` with each coordinate running
``linspace(-bound, bound, res)`` (both ends included), in the one world frame of
:mod:`text3d.cameras` (+Y up, front +Z), so mesh vertices need no axis swap.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import numpy as np
import torch
import trimesh

from text3d.errors import UserError
from text3d.export.config import ExportConfig, check_export_config

log = logging.getLogger(__name__)

DensityFn = Callable[[torch.Tensor], torch.Tensor]
SilhouetteFn = Callable[[trimesh.Trimesh], torch.Tensor]
CHUNK = 65536
SURFACE_OFFSETS = (0.0, 0.0075, 0.015, 0.025, 0.035, 0.05)  # export.fit_opacity's inward offsets, times the bound


def sample_density_grid(density_fn: DensityFn, bound: float, resolution: int,
                        device: Optional[torch.device | str] = None, chunk: int = CHUNK) -> np.ndarray:
    """Evaluate ``density_fn`` on the ``resolution^3`` grid over [-bound, bound]^3 (float32, [i,j,k] = x,y,z)."""
    res = int(resolution)
    axis = torch.linspace(-bound, bound, res, dtype=torch.float32)
    grid = np.empty((res, res, res), dtype=np.float32)
    flat = grid.reshape(-1)
    yz = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)  # [res*res, 2] (y, z)
    slabs = max(1, min(res, chunk // (res * res)))  # x-slices per call, <= chunk points when possible
    with torch.no_grad():
        for i0 in range(0, res, slabs):
            xs = axis[i0:i0 + slabs]
            pts = torch.cat([xs.repeat_interleave(yz.shape[0])[:, None], yz.repeat(len(xs), 1)], dim=1)
            for s in range(0, pts.shape[0], chunk):
                p = pts[s:s + chunk]
                if device is not None:
                    p = p.to(device)
                out = density_fn(p)
                out = out.detach().reshape(-1).float().cpu().numpy()
                if out.shape[0] != p.shape[0]:
                    raise ValueError(f"density_fn returned {out.shape[0]} values for {p.shape[0]} points")
                start = i0 * res * res + s
                flat[start:start + out.shape[0]] = out
    return grid


def auto_threshold(grid: np.ndarray) -> float:
    """The iso-level used when ``ExportConfig.threshold`` is None.

    Rule: Otsu's level, i.e. the value that best splits the grid's values into two classes
    ("empty" and "occupied") by maximising the between-class variance. When every value is >= 0
    (NeRF densities after their activation) the split is made on ``log1p(density)`` and mapped back,
    so the long tail of very dense voxels does not drag the level up into the object's core.
    Raises :class:`UserError` when the grid is (nearly) constant: there is no surface to find.
    """
    from skimage.filters import threshold_otsu

    values = np.asarray(grid, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise UserError("cannot export a mesh: the density field is NaN/inf everywhere")
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        raise UserError(f"cannot export a mesh: the density field is constant ({hi:.4g}) inside the export "
                        "bound, so it has no surface")
    if values.size > 4_000_000:  # a fixed subsample is plenty for a 256-bin histogram
        values = values[:: values.size // 2_000_000]
    if lo >= 0.0:
        level = float(np.expm1(threshold_otsu(np.log1p(values), nbins=256)))
    else:
        level = float(threshold_otsu(values, nbins=256))
    # keep the level strictly inside the range so at least one voxel lies on each side
    eps = 1e-6 * (hi - lo)
    return float(min(max(level, lo + eps), hi - eps))


def _signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    v = np.asarray(vertices, dtype=np.float64)
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


def remove_small_components(mesh: trimesh.Trimesh, min_fraction: float) -> trimesh.Trimesh:
    """Drop edge-connected face components with fewer faces than ``min_fraction`` x the largest one's."""
    if len(mesh.faces) == 0 or min_fraction <= 0.0:
        return mesh
    labels = trimesh.graph.connected_component_labels(mesh.face_adjacency, node_count=len(mesh.faces))
    counts = np.bincount(labels)
    keep_label = counts >= min_fraction * counts.max()
    if keep_label.all():
        return mesh
    log.info("export: dropping %d of %d mesh components (below %.1f%% of the largest)",
             int((~keep_label).sum()), len(counts), 100 * min_fraction)
    out = mesh.copy()
    out.update_faces(keep_label[labels])
    out.remove_unreferenced_vertices()
    return out


def smooth_mesh(mesh: trimesh.Trimesh, iterations: int) -> trimesh.Trimesh:
    """Taubin smoothing in place (``iterations`` shrink/inflate pairs): removes voxel-scale roughness while
    keeping the enclosed volume, unlike plain Laplacian smoothing, which shrinks the mesh."""
    if iterations > 0 and len(mesh.faces):
        trimesh.smoothing.filter_taubin(mesh, lamb=0.5, nu=0.53, iterations=iterations)
    return mesh


def _marching_cubes(grid: np.ndarray, bound: float, level: float) -> trimesh.Trimesh:
    from skimage.measure import marching_cubes

    res = grid.shape[0]
    h = 2.0 * bound / (res - 1)
    hi = float(grid.max())
    # pad one layer of "empty" so surfaces that reach the bound are closed (watertight assets);
    # the pad value keeps the closing cap within half a voxel outside the bound
    pad_value = level - max(hi - level, level - float(grid.min()), 1e-6)
    padded = np.pad(grid, 1, mode="constant", constant_values=pad_value)
    verts, faces, _, _ = marching_cubes(padded, level=level, spacing=(h, h, h), allow_degenerate=False,
                                        method="lewiner")
    verts = verts - (bound + h)  # padded index 1 is world -bound
    mesh = trimesh.Trimesh(verts.astype(np.float64), faces.astype(np.int64), process=True)
    if len(mesh.faces):
        mesh.update_faces(mesh.nondegenerate_faces())
        mesh.remove_unreferenced_vertices()
    return mesh


def fill_cavities(grid: np.ndarray, level: float) -> np.ndarray:
    """The grid with every closed pocket of empty space inside the surface made solid.

    Score distillation shapes only what the cameras see; the density inside an object is unconstrained and
    often falls below the iso-level in places, so marching cubes adds an inner shell around each such pocket:
    hidden faces that take part of the face budget and of the texture atlas, and a wall that makes the
    enclosed volume wrong. A pocket is an empty region (density <= ``level``) not connected, through
    face-adjacent voxels, to the grid's border (``scipy.ndimage.binary_fill_holes``); its voxels get the grid's
    maximum. Openings that reach the outside (a mug's hollow, a torus's hole) are not pockets and stay."""
    from scipy.ndimage import binary_fill_holes

    inside = grid > level
    pockets = binary_fill_holes(inside) & ~inside
    if not pockets.any():
        return grid
    filled = grid.copy()
    filled[pockets] = grid.max()
    return filled


def extract_mesh_from_grid(grid: np.ndarray, bound: float, cfg: ExportConfig) -> trimesh.Trimesh:
    """Marching cubes on a precomputed density grid; returns a closed, outward-wound mesh in world units.

    Surface = ``{density == level}`` with the inside where density > level; ``level`` is
    ``cfg.threshold`` or :func:`auto_threshold`. Components smaller than ``cfg.min_component_fraction``
    of the largest (in faces) are removed; decimation to ``cfg.max_faces`` happens at export
    (:func:`text3d.export.decimate.decimate`). Raises :class:`UserError` when no surface exists at the level.
    """
    check_export_config(cfg)
    grid = np.asarray(grid, dtype=np.float32)
    if grid.ndim != 3 or len(set(grid.shape)) != 1 or grid.shape[0] < 2:
        raise ValueError(f"density grid must be [res, res, res], got {grid.shape}")
    if not np.isfinite(grid).all():
        finite = grid[np.isfinite(grid)]
        low = float(finite.min()) if finite.size else 0.0
        high = float(finite.max()) if finite.size else 0.0
        grid = np.nan_to_num(grid, nan=low, posinf=high, neginf=low)  # NaN counts as empty
    level = auto_threshold(grid) if cfg.threshold is None else float(cfg.threshold)
    lo, hi = float(grid.min()), float(grid.max())
    if not lo < level < hi:
        raise UserError(f"cannot export a mesh: no surface at density level {level:.4g}, the density inside the "
                        f"export bound ranges over [{lo:.4g}, {hi:.4g}] (set export.threshold inside that range)")

    if cfg.fill_cavities:
        grid = fill_cavities(grid, level)
    mesh = _marching_cubes(grid, bound, level)
    if len(mesh.faces) == 0:
        raise UserError(f"cannot export a mesh: marching cubes found no surface at density level {level:.4g}")
    mesh = remove_small_components(mesh, float(cfg.min_component_fraction))
    smooth_mesh(mesh, int(cfg.smooth_iterations))
    if _signed_volume(mesh.vertices, mesh.faces) < 0.0:
        mesh.invert()  # outward normals: positive enclosed volume
    mesh.metadata["iso_level"] = level
    return mesh


def extract_mesh_matching(density_fn: DensityFn, bound: float, cfg: ExportConfig, silhouettes: SilhouetteFn,
                          target: torch.Tensor, device: Optional[torch.device | str] = None,
                          offsets: tuple[float, ...] = SURFACE_OFFSETS) -> trimesh.Trimesh:
    """The surface moved inwards until its silhouettes best match ``target``, the renderer's own opacity
    [N, 1, H, W] (ExportConfig's ``fit_opacity``).

    Otsu's split of the grid puts the level where the density histogram parts, which for a soft NeRF density lies
    outside the edge the renderer draws: a ray reaches opacity 0.5 only some way into the density's rise, so the
    Otsu mesh is larger than the renders the teacher judged (docs/guidance.md, 2026-12-07). A higher level does not
    fix it: a NeRF's density is not monotone inwards (behind a cube's face it falls from 3 to 0.3 before the
    centre's 10), so a level above that dip leaves a shell with holes and a rougher surface. Instead the mesh
    :func:`extract_mesh` gives is moved along its vertex normals, inwards by ``d * bound`` for each ``d`` in
    ``offsets``; ``silhouettes(mesh)`` renders each from the cameras of ``target``, and the one of the highest mean
    IoU of the masks (both at 0.5) is returned, with ``metadata["surface_offset"]`` (world units) and every
    candidate's ``(offset, iou)`` in ``metadata["offset_scores"]``. Offsets are small against the objects (at
    most 0.05 of the bound, three voxels of the default 128^3 grid), so the smoothed surface does not fold."""
    from text3d.utils.masks import silhouette_iou

    mesh = extract_mesh(density_fn, bound, cfg, device=device)
    normals = np.asarray(mesh.vertex_normals, dtype=np.float64)
    best, scores = None, []
    for d in offsets:
        moved = mesh.copy()
        moved.vertices = np.asarray(mesh.vertices) - d * bound * normals
        iou = float(np.mean(silhouette_iou(silhouettes(moved), target)))
        scores.append((d * bound, iou))
        if best is None or iou > best[0]:
            best = (iou, moved, d * bound)
    chosen = best[1]
    chosen.metadata.update(mesh.metadata, surface_offset=best[2], offset_scores=scores)
    return chosen


def extract_mesh(density_fn: DensityFn, bound: float, cfg: ExportConfig,
                 device: Optional[torch.device | str] = None) -> trimesh.Trimesh:
    """Sample ``density_fn`` on a ``cfg.grid_resolution``^3 grid over [-bound, bound]^3 and extract the surface.

    ``density_fn(points [N,3]) -> [N]`` is called under ``torch.no_grad`` with N <= 65536; points are
    created on ``device`` when given. See :func:`extract_mesh_from_grid` for the rest.
    """
    check_export_config(cfg)
    grid = sample_density_grid(density_fn, bound, int(cfg.grid_resolution), device=device)
    return extract_mesh_from_grid(grid, bound, cfg)
