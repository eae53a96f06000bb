"""Triangle-mesh rendering: rasterise -> interpolate attributes -> sample textures (nvdiffrast's model).

The pure-PyTorch path here is first-class and runs everywhere; an nvdiffrast backend for CUDA will
sit behind the same functions.
"""

from text3d.renderers.mesh.rasterize import Rasterization, interpolate, project, rasterize, sample_texture
from text3d.renderers.mesh.render import MeshAsset, render_mesh

__all__ = ["MeshAsset", "Rasterization", "interpolate", "project", "rasterize", "render_mesh", "sample_texture"]
