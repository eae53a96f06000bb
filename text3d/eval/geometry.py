"""Geometric scores of a mesh against a ground-truth SDF: volumetric IoU, Chamfer distance, top-view IoU and hole.

Frame: :mod:`text3d.cameras`, +Y up, so a yaw is a rotation about the Y axis,
``R(a) = [[cos a, 0, sin a], [0, 1, 0], [-sin a, 0, cos a]]``.

Normalisation (shape, not placement: the renders' silhouette IoU already scores where the object stands and
how big it is): each shape is translated to the centre of its axis-aligned bounding box and divided by the
length of that box's diagonal, ``x' = (x - (lo + hi) / 2) / |hi - lo|``. The truth's box is that of its
zero-level surface (marching cubes of the SDF on a ``TRUTH_RESOLUTION^3`` grid over ``[-TRUTH_BOUND,
TRUTH_BOUND]^3``); the mesh's box is taken after its yaw, so a turned cube is normalised like an upright one.

Yaw: the mesh is turned by every yaw ``a`` of ``0, YAW_STEP, ..., 360 - YAW_STEP`` degrees (all objects,
symmetric or not), and the yaw of least Chamfer distance is kept; the three figures are all measured at that
one yaw (reported as ``geometry_yaw``).

* Chamfer distance, with ``A`` and ``B`` ``SURFACE_POINTS`` points drawn uniformly by area on the normalised
  mesh and true surface: ``CD = (mean_{a in A} min_{b in B} |a - b| + mean_{b in B} min_{a in A} |a - b|) / 2``
  (nearest neighbours by :class:`scipy.spatial.cKDTree`), in units of the bounding-box diagonal.
* Volumetric IoU ``|M & T| / |M | T|`` over the centres of a ``GRID^3`` grid of cells over the common box
  ``[-h, h]^3`` (``h`` 2% beyond the larger half extent of the two normalised shapes). ``T``: the SDF < 0 at the
  point mapped back to world units. ``M``: the mesh's inside, by ray parity along grid lines in each of the
  three axis directions (a point is inside along one direction when an odd number of triangle crossings lies
  below it on that line) and a majority vote of the three. Exported meshes need not be watertight after
  decimation or component removal: a hole or a stray face flips the parity of the few grid lines that pass
  through it, in one direction only, and the vote outvotes it; the test ignores the faces' winding. Grid lines
  are moved by a tiny irrational fraction of a cell so none passes exactly through an edge or vertex.
* Top-view IoU: the same IoU of the orthographic projections along +Y, ``any_y M`` and ``any_y T``, on the
  ``GRID^2`` (x, z) grid (a cube's top view is a square, a drum's a disc: ``pi / 4`` of it).
* Top-view hole: where the truth's top view has a see-through hole (empty cells that no empty path joins to the
  grid's border: a torus's), the share ``|H_T & ~any_y M| / |H_T|`` of that hole ``H_T`` the mesh leaves empty
  from the top too (1: the hole is open; 0: a membrane covers it); ``None`` for objects with no such hole.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from text3d.errors import UserError

SDF = Callable[[torch.Tensor], torch.Tensor]

GRID = 64
YAW_STEP = 5.0
SURFACE_POINTS = 4000
TRUTH_RESOLUTION = 96
TRUTH_BOUND = 0.7  # the world's objects fit in [-0.65, 0.65]^3
MARGIN = 1.02
_OFFSET = (3.183099e-4, 2.718282e-4)  # fractions of a cell the grid lines are moved by (see the docstring)


def yaw_matrix(degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about the up axis +Y."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def bounding_frame(vertices: np.ndarray) -> tuple[np.ndarray, float]:
    """(centre, diagonal length) of the axis-aligned bounding box of ``vertices`` [V, 3]."""
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    return (lo + hi) / 2.0, float(np.linalg.norm(hi - lo))


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` points uniform by area on the triangles (square-root barycentric sampling)."""
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    if not area.sum() > 0:
        raise UserError("the mesh has no surface (every face is degenerate)")
    idx = rng.choice(len(faces), size=count, p=area / area.sum())
    r1, r2 = np.sqrt(rng.random(count))[:, None], rng.random(count)[:, None]
    return (1 - r1) * a[idx] + r1 * (1 - r2) * b[idx] + r1 * r2 * c[idx]


def sdf_surface(sdf: SDF, bound: float = TRUTH_BOUND,
                resolution: int = TRUTH_RESOLUTION) -> tuple[np.ndarray, np.ndarray]:
    """(vertices, faces) of the zero level of ``sdf`` over ``[-bound, bound]^3`` by marching cubes."""
    from skimage.measure import marching_cubes

    from text3d.export.marching import sample_density_grid

    grid = sample_density_grid(lambda p: -sdf(p), bound, resolution)  # positive inside
    h = 2.0 * bound / (resolution - 1)
    padded = np.pad(grid, 1, mode="constant", constant_values=-1.0)  # closed where the object meets the bound
    verts, faces, _, _ = marching_cubes(padded, level=0.0, spacing=(h, h, h))
    return verts - (bound + h), faces.astype(np.int64)


def chamfer(a: np.ndarray, b: np.ndarray, tree_b=None) -> float:
    """Symmetric Chamfer distance (the mean of the two mean nearest-neighbour distances) of point sets."""
    from scipy.spatial import cKDTree

    tree_b = tree_b if tree_b is not None else cKDTree(b)
    return 0.5 * float(tree_b.query(a)[0].mean() + cKDTree(a).query(b)[0].mean())


def _parity(vertices: np.ndarray, faces: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
    """Inside by ray parity along ``axis``: [n, n, n] booleans on the grid ``coords`` (x, y, z order)."""
    n = len(coords)
    h = coords[1] - coords[0]
    u, w = [k for k in range(3) if k != axis]
    tri = vertices[faces]  # [F, 3 corners, 3]
    pu, pw, pa = tri[:, :, u], tri[:, :, w], tri[:, :, axis]
    lines_u, lines_w = coords + _OFFSET[0] * h, coords + _OFFSET[1] * h
    i0 = np.clip(np.ceil((pu.min(1) - lines_u[0]) / h), 0, n).astype(np.int64)
    i1 = np.clip(np.floor((pu.max(1) - lines_u[0]) / h), -1, n - 1).astype(np.int64)
    j0 = np.clip(np.ceil((pw.min(1) - lines_w[0]) / h), 0, n).astype(np.int64)
    j1 = np.clip(np.floor((pw.max(1) - lines_w[0]) / h), -1, n - 1).astype(np.int64)
    ni, nj = np.maximum(i1 - i0 + 1, 0), np.maximum(j1 - j0 + 1, 0)
    counts = ni * nj
    t = np.repeat(np.arange(len(faces)), counts)  # one row per (triangle, grid line in its 2D box)
    local = np.arange(len(t)) - np.repeat(np.cumsum(counts) - counts, counts)
    li = i0[t] + local // np.maximum(nj[t], 1)
    lj = j0[t] + local % np.maximum(nj[t], 1)
    x, y = lines_u[li], lines_w[lj]
    x0, x1, x2 = pu[t, 0], pu[t, 1], pu[t, 2]
    y0, y1, y2 = pw[t, 0], pw[t, 1], pw[t, 2]
    d = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    ok = np.abs(d) > 1e-18
    d = np.where(ok, d, 1.0)
    l1 = ((x - x0) * (y2 - y0) - (x2 - x0) * (y - y0)) / d
    l2 = ((x1 - x0) * (y - y0) - (x - x0) * (y1 - y0)) / d
    hit = ok & (l1 >= 0) & (l2 >= 0) & (l1 + l2 <= 1)
    t, li, lj, l1, l2 = t[hit], li[hit], lj[hit], l1[hit], l2[hit]
    crossing = (1 - l1 - l2) * pa[t, 0] + l1 * pa[t, 1] + l2 * pa[t, 2]
    first_above = np.searchsorted(coords, crossing, side="right")  # grid points above the crossing
    toggles = np.zeros((n, n, n + 1), dtype=np.int32)
    np.add.at(toggles, (li, lj, first_above), 1)
    inside = (np.cumsum(toggles, axis=2)[:, :, :n] % 2).astype(bool)  # [u, w, axis]
    return np.moveaxis(inside, -1, axis)


def mesh_occupancy(vertices: np.ndarray, faces: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """[n, n, n] inside test of the grid ``coords`` ^ 3: majority of the ray parities along x, y and z."""
    votes = sum(_parity(vertices, faces, coords, axis).astype(np.int8) for axis in range(3))
    return votes >= 2


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def geometry_scores(vertices, faces, sdf: SDF, grid: int = GRID, yaw_step: float = YAW_STEP,
                    points: int = SURFACE_POINTS, seed: int = 0) -> dict:
    """``volume_iou``, ``chamfer``, ``top_iou`` and ``geometry_yaw`` (degrees) of a mesh [V, 3] / [F, 3]
    against the object whose signed distance (negative inside, world units) is ``sdf`` (see the module
    docstring)."""
    from scipy.spatial import cKDTree

    vertices, faces = np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64)
    if len(faces) == 0:
        raise UserError("the mesh has no faces")
    rng = np.random.default_rng(seed)
    truth_v, truth_f = sdf_surface(sdf)
    if len(truth_f) == 0:
        raise UserError("the ground-truth SDF has no zero level inside the world's bound")
    truth_c, truth_s = bounding_frame(truth_v)
    truth_v = (truth_v - truth_c) / truth_s
    truth_pts = sample_surface(truth_v, truth_f, points, rng)
    truth_tree = cKDTree(truth_pts)
    mesh_pts = sample_surface(vertices, faces, points, rng)

    best = None
    for yaw in np.arange(0.0, 360.0, yaw_step):
        rot = yaw_matrix(yaw)
        centre, scale = bounding_frame(vertices @ rot.T)
        if scale <= 0:
            raise UserError("the mesh is a single point")
        cd = chamfer((mesh_pts @ rot.T - centre) / scale, truth_pts, truth_tree)
        if best is None or cd < best[0]:
            best = (cd, float(yaw), rot, centre, scale)
    cd, yaw, rot, centre, scale = best

    mesh_v = (vertices @ rot.T - centre) / scale
    half = MARGIN * max(np.abs(mesh_v).max(), np.abs(truth_v).max())
    coords = -half + (np.arange(grid) + 0.5) * (2.0 * half / grid)
    inside_mesh = mesh_occupancy(mesh_v, faces, coords)
    pts = np.stack(np.meshgrid(coords, coords, coords, indexing="ij"), axis=-1).reshape(-1, 3) * truth_s + truth_c
    with torch.no_grad():
        inside_truth = (sdf(torch.as_tensor(pts, dtype=torch.float32)) < 0).numpy().reshape(grid, grid, grid)
    top_mesh, top_truth = inside_mesh.any(axis=1), inside_truth.any(axis=1)
    return {"volume_iou": iou(inside_mesh, inside_truth), "chamfer": cd, "top_iou": iou(top_mesh, top_truth),
            "top_hole": hole_kept(top_mesh, top_truth), "geometry_yaw": yaw}


def enclosed_empty(top: np.ndarray) -> np.ndarray:
    """The empty pixels of a top-view mask [G, G] that no empty path joins to its border: a ring's hole."""
    from scipy import ndimage

    labels, _ = ndimage.label(~top)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return (labels > 0) & ~np.isin(labels, border)


def hole_kept(top_mesh: np.ndarray, top_truth: np.ndarray) -> float | None:
    """The share of the truth's see-through hole (seen from the top: a torus's) that is see-through in the mesh's
    top view too; None when the truth has no such hole. A torus whose hole is closed by a membrane scores 0."""
    hole = enclosed_empty(top_truth)
    if not hole.any():
        return None
    return float((hole & ~top_mesh).sum() / hole.sum())
