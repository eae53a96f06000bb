"""UV atlas of a mesh with xatlas: charts cut along seams, packed into one square texture page.

UV convention (OBJ's and trimesh's): u runs left to right, v runs bottom to top, so texture image
row 0 holds v = 1. glTF stores v flipped; trimesh's glTF writer applies that flip.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple, Optional

import numpy as np
import trimesh

from text3d.errors import UserError

log = logging.getLogger(__name__)


class UVMesh(NamedTuple):
    """An unwrapped mesh: seam vertices duplicated, ``vmapping[i]`` = index of vertex i in the input mesh."""

    vertices: np.ndarray  # [V', 3] float32
    faces: np.ndarray  # [F, 3] int32
    uvs: np.ndarray  # [V', 2] float32 in [0, 1]
    vmapping: np.ndarray  # [V'] int64


def _generate(positions: np.ndarray, indices: np.ndarray, resolution: int, padding: int):
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(positions, indices)
    chart_options = xatlas.ChartOptions()
    pack_options = xatlas.PackOptions()
    pack_options.resolution = int(resolution)
    pack_options.padding = int(padding)
    pack_options.bilinear = True  # leave room for bilinear filtering around each chart
    atlas.generate(chart_options, pack_options)
    return atlas


def _chart_positions(mesh: trimesh.Trimesh, iterations: int) -> np.ndarray:
    """Vertex positions xatlas segments charts on: a Taubin-smoothed copy of the mesh.

    Marching-cubes meshes are full of slivers whose normals jitter from face to face, and xatlas
    cuts charts wherever normals jump: on the raw mesh it makes hundreds of confetti charts (seams
    everywhere), on a lightly smoothed copy a handful. Only the charting sees the smoothed copy; the
    UV triangles it returns are valid (non-overlapping) whatever the 3D positions, so the output
    keeps the original vertices with slightly different texel density.
    """
    if iterations <= 0:
        return np.ascontiguousarray(mesh.vertices, dtype=np.float32)
    smooth = trimesh.Trimesh(np.array(mesh.vertices, dtype=np.float64), np.array(mesh.faces), process=False)
    trimesh.smoothing.filter_taubin(smooth, iterations=int(iterations))
    positions = np.asarray(smooth.vertices, dtype=np.float32)
    if not np.isfinite(positions).all():
        return np.ascontiguousarray(mesh.vertices, dtype=np.float32)
    return np.ascontiguousarray(positions)


def unwrap_uv_mapped(mesh: trimesh.Trimesh, texture_size: Optional[int] = None, padding: int = 2,
                     smooth_iterations: int = 10) -> UVMesh:
    """Like :func:`unwrap_uv` but also returns the map from new vertices to the input mesh's vertices."""
    vertices = np.ascontiguousarray(mesh.vertices, dtype=np.float32)
    faces = np.ascontiguousarray(mesh.faces, dtype=np.uint32)
    if len(faces) == 0:
        raise UserError("cannot unwrap an empty mesh (no faces)")
    positions = _chart_positions(mesh, smooth_iterations)
    resolution = int(texture_size or 0)
    atlas = _generate(positions, faces, resolution, padding)
    if atlas.atlas_count != 1 and resolution:
        # charts did not fit one page of that resolution: let xatlas size a single page itself
        log.info("export: xatlas needed %d pages at %d px, packing into one page instead", atlas.atlas_count,
                 resolution)
        atlas = _generate(positions, faces, 0, padding)
    if atlas.atlas_count != 1:
        raise RuntimeError(f"xatlas produced {atlas.atlas_count} texture pages, expected 1")
    vmapping, new_faces, uvs = atlas.get_mesh(0)
    vmapping = vmapping.astype(np.int64)
    uvs = np.asarray(uvs, dtype=np.float32)
    if not (np.isfinite(uvs).all() and uvs.min() >= -1e-4 and uvs.max() <= 1 + 1e-4):
        raise RuntimeError("xatlas returned UVs outside [0, 1]")
    return UVMesh(vertices[vmapping], new_faces.astype(np.int32), np.clip(uvs, 0.0, 1.0), vmapping)


def unwrap_uv(mesh: trimesh.Trimesh, texture_size: Optional[int] = None, padding: int = 2,
              smooth_iterations: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut ``mesh`` into charts and pack them into [0, 1]^2 with xatlas.

    Returns ``(vertices [V',3] float32, faces [F,3] int32, uvs [V',2] float32)``; V' >= V because
    vertices on chart seams are duplicated, faces keep their order. ``texture_size`` (texels) and
    ``padding`` (texels between charts) tune the packing for the texture the atlas will be baked into;
    ``smooth_iterations`` Taubin steps smooth the copy that charts are cut on (see ``_chart_positions``).
    """
    out = unwrap_uv_mapped(mesh, texture_size, padding, smooth_iterations)
    return out.vertices, out.faces, out.uvs


def atlas_padding(seam_padding: int) -> int:
    """Gap (texels) xatlas leaves between charts for a given bake padding: half of it, at least 1.

    Each chart's colours are later dilated ``seam_padding`` texels outwards, so neighbouring charts
    meet in the middle of the gap and bilinear/mipmapped lookups near a seam stay on the chart's colours.
    """
    return max(1, int(math.ceil(seam_padding / 2)))
