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
LEVEL_FACTORS = (0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  # the candidates of the ``opacity`` rule, times Otsu's level
CORE_DEPTH = 3 / 128  # the ``opacity`` rule's surface moves in at most this fraction of the grid from Otsu's


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


def solid_core(grid: np.ndarray, level: float, depth: int) -> np.ndarray:
    """The grid with the solid at ``level`` (pockets filled), eroded by ``depth`` voxels, set to the grid's maximum.

    A NeRF's density is not monotone inwards: behind the surface it often falls again (0.3 a quarter of the way in
    from a cube's face, against 3 at the face and 10 at the centre), so a level above Otsu's cuts through that dip
    and leaves a shell with holes. With the core solid, a higher level's surface lies between Otsu's and the core:
    it moves in where the shell is faint, by at most ``depth`` voxels, and never hollows the object."""
    from scipy.ndimage import binary_erosion, binary_fill_holes

    core = binary_erosion(binary_fill_holes(grid > level), iterations=depth) if depth > 0 else grid > level
    cored = grid.copy()
    cored[core] = grid.max()
    return cored


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
                          factors: tuple[float, ...] = LEVEL_FACTORS) -> trimesh.Trimesh:
    """The mesh whose silhouettes best match ``target``, the renderer's own opacity [N, 1, H, W] (ExportConfig's
    ``iso_level = opacity`` rule).

    Otsu's split of the grid puts the level where the density histogram parts, which for a soft NeRF density lies
    outside the surface the renderer draws: a ray reaches opacity 0.5 only some way into the density's rise, so
    the Otsu mesh is larger than the renders the teacher judged (docs/guidance.md, 2026-12-07). Each level
    ``otsu * f`` for ``f`` in ``factors`` (those inside the grid's range) is extracted as
    :func:`extract_mesh_from_grid` would from the grid with its :func:`solid_core` ``CORE_DEPTH`` in from Otsu's
    surface (so that no level hollows the object), ``silhouettes(mesh)`` renders it from the
    cameras of ``target``, and the mesh of the highest mean IoU of the masks (both at 0.5) is returned, its level
    in ``metadata["iso_level"]`` and every candidate's ``(level, iou)`` in ``metadata["level_scores"]``."""
    from dataclasses import replace

    from text3d.utils.masks import silhouette_iou

    check_export_config(cfg)
    grid = sample_density_grid(density_fn, bound, int(cfg.grid_resolution), device=device)
    otsu, top = auto_threshold(grid), float(np.nanmax(grid))
    cored = solid_core(grid, otsu, max(1, round(CORE_DEPTH * grid.shape[0])))
    best, scores = None, []
    for f in factors:
        level = otsu * f
        if not level < top:
            break
        try:
            mesh = extract_mesh_from_grid(cored, bound, replace(cfg, threshold=level))
        except UserError:
            continue
        iou = float(np.mean(silhouette_iou(silhouettes(mesh), target)))
        scores.append((level, iou))
        if best is None or iou > best[0]:
            best = (iou, mesh)
    if best is None:
        return extract_mesh_from_grid(grid, bound, cfg)
    best[1].metadata["level_scores"] = scores
    return best[1]


def extract_mesh(density_fn: DensityFn, bound: float, cfg: ExportConfig,
                 device: Optional[torch.device | str] = None) -> trimesh.Trimesh:
    """Sample ``density_fn`` on a ``cfg.grid_resolution``^3 grid over [-bound, bound]^3 and extract the surface.

    ``density_fn(points [N,3]) -> [N]`` is called under ``torch.no_grad`` with N <= 65536; points are
    created on ``device`` when given. See :func:`extract_mesh_from_grid` for the rest.
    """
    check_export_config(cfg)
    grid = sample_density_grid(density_fn, bound, int(cfg.grid_resolution), device=device)
    return extract_mesh_from_grid(grid, bound, cfg)
