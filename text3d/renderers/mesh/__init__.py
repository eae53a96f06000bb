"""Triangle-mesh rendering: rasterise -> interpolate attributes -> sample textures -> antialias edges
(nvdiffrast's model).

Two backends behind :func:`render_mesh`: the pure-PyTorch rasteriser (first-class, runs everywhere,
with analytic edge antialiasing) and nvdiffrast on CUDA (lazily imported, chosen by ``backend="auto"``
when installed).
"""

from text3d.renderers.mesh.rasterize import Rasterization, interpolate, project, rasterize, sample_texture
from text3d.renderers.mesh.antialias import antialias
from text3d.renderers.mesh.render import MESH_BACKENDS, MeshAsset, render_mesh, resolve_mesh_backend

__all__ = ["MESH_BACKENDS", "MeshAsset", "Rasterization", "antialias", "interpolate", "project", "rasterize",
           "render_mesh", "resolve_mesh_backend", "sample_texture"]
