"""The renderers of the mesh stages (Magic3D / ProlificDreamer stages 2 and 3), with the NeRF's interface.

* :class:`GeometryStageModel`: a DMTet surface initialised from the stage-1 NeRF's density (SDF =
  iso-level minus density), shaded with the NeRF's frozen albedo field; guidance moves the SDF and the
  vertex offsets, regularised by normal consistency and a Laplacian (returned as scalars).
* :class:`TextureStageModel`: the geometry frozen as a triangle mesh, a hash-grid albedo field (the
  NeRF's, fine-tuned) evaluated on the surface under every pixel; guidance trains the field, which is
  then baked into a UV atlas at export.

Both render through :func:`text3d.renderers.mesh.render_mesh` (antialiased, nvdiffrast on CUDA) and
composite over the NeRF's background, so the trainer and guidance do not care which stage runs: both
implement :class:`text3d.renderers.protocol.Renderer`.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from text3d.cameras import Cameras
from text3d.renderers.dmtet import DMTet, SurfaceMesh, laplacian_loss, normal_consistency_loss
from text3d.renderers.mesh.render import MeshAsset, render_mesh
from text3d.renderers.protocol import ColourField, ExportSurface, RenderOutput

if TYPE_CHECKING:
    from text3d.export import ExportConfig


def density_iso_level(density_fn, bound: float, resolution: int = 64) -> float:
    """The export's automatic iso-level (Otsu on log-density) of a density field."""
    from text3d.export.marching import auto_threshold, sample_density_grid

    return auto_threshold(sample_density_grid(density_fn, bound, resolution))


def _composite(out: dict, background: nn.Module, cameras: Cameras, height: int, width: int) -> dict:
    """Premultiplied mesh colour over the NeRF background module (evaluated along each pixel's ray)."""
    _, dirs = cameras.rays(height, width)
    bg = background(dirs.reshape(-1, 3).float(), None).view(len(cameras), height, width, 3).permute(0, 3, 1, 2)
    out["rgb"] = out["rgb"] + (1.0 - out["opacity"]) * bg
    out["opacity_sparsity"] = out["opacity"].mean()
    return out


class MeshStageModel(nn.Module):
    """The base of a mesh stage's model: it has :meth:`surface` and :meth:`colour_field` (a subclass defines them
    and ``forward``); export and the occupancy hook of :class:`~text3d.renderers.protocol.Renderer` come with it."""

    def surface(self, export: "ExportConfig | None" = None) -> SurfaceMesh:
        raise NotImplementedError

    def colour_field(self) -> ColourField:
        raise NotImplementedError

    def update_occupancy(self, step: int) -> None:  # the NeRF's interface; nothing to do for a surface
        pass

    def anneal(self, progress: float) -> None:  # the NeRF's interface; nothing to do for a surface
        return None

    @torch.no_grad()
    def export_surface(self, export: "ExportConfig") -> ExportSurface:
        """The surface welded into a trimesh with pieces under ``export.min_component_fraction`` of the largest
        dropped (as marching cubes does for a NeRF), coloured by the colour field's albedo."""
        import trimesh

        from text3d.export.marching import remove_small_components

        surface = self.surface()
        mesh = trimesh.Trimesh(surface.vertices.detach().cpu().numpy(), surface.faces.cpu().numpy(), process=True)
        mesh = remove_small_components(mesh, float(export.min_component_fraction))
        field = self.colour_field()
        device = surface.vertices.device
        return ExportSurface(mesh, lambda p: field.query_albedo(p.to(device)).float())


class GeometryStageModel(MeshStageModel):
    def __init__(self, nerf, grid_resolution: int = 64, iso_level: float | None = None):
        super().__init__()
        bound = float(nerf.cfg.bound)
        self.dmtet = DMTet(grid_resolution, bound)
        level = density_iso_level(nerf.field.query_density, bound) if iso_level is None else iso_level
        self.register_buffer("iso_level", torch.tensor(float(level)))
        self.albedo_field = copy.deepcopy(nerf.field).requires_grad_(False)
        self.background = copy.deepcopy(nerf.background).requires_grad_(False)
        with torch.no_grad():
            self.dmtet.init_sdf(lambda p: level - self.albedo_field.query_density(p.to(self.dmtet.grid.device)).float())

    def surface(self, export: "ExportConfig | None" = None) -> SurfaceMesh:
        """The DMTet surface (differentiable in the SDF and offsets); ``export`` is not needed."""
        return self.dmtet()

    def colour_field(self) -> ColourField:
        """The field whose ``query_albedo`` colours this surface (the frozen NeRF's)."""
        return self.albedo_field

    def forward(self, cameras: Cameras, height: int, width: int, shading: str = "lambertian",
                light_dirs=None, ambient: float = 0.3, **_) -> RenderOutput:
        mesh = self.surface()
        if mesh.faces.numel() == 0:
            raise ValueError("the DMTet surface is empty (the SDF has no zero crossing)")
        asset = MeshAsset(mesh.vertices, mesh.faces)
        out = render_mesh(asset, cameras, height, width, shading, light_dirs, ambient, background=(0.0, 0.0, 0.0),
                          albedo_fn=lambda p: self.albedo_field.query_albedo(p).float())
        out = _composite(out, self.background, cameras.to(mesh.vertices.device), height, width)
        out["laplacian"] = laplacian_loss(mesh)
        out["normal_consistency"] = normal_consistency_loss(mesh)
        return out


class TextureStageModel(MeshStageModel):
    def __init__(self, vertices: torch.Tensor, faces: torch.Tensor, field: nn.Module, background: nn.Module):
        super().__init__()
        self.register_buffer("vertices", vertices.detach().float().clone())
        self.register_buffer("faces", faces.detach().long().clone())
        self.field = copy.deepcopy(field).requires_grad_(True)
        self.background = copy.deepcopy(background).requires_grad_(False)

    def surface(self, export: "ExportConfig | None" = None) -> SurfaceMesh:
        """The frozen mesh; ``export`` is not needed."""
        return SurfaceMesh(self.vertices, self.faces)

    def colour_field(self) -> ColourField:
        """The field whose ``query_albedo`` colours this surface (the one this stage trains)."""
        return self.field

    def forward(self, cameras: Cameras, height: int, width: int, shading: str = "albedo",
                light_dirs=None, ambient: float = 0.3, **_) -> RenderOutput:
        asset = MeshAsset(self.vertices, self.faces)
        out = render_mesh(asset, cameras, height, width, shading, light_dirs, ambient, background=(0.0, 0.0, 0.0),
                          albedo_fn=lambda p: self.field.query_albedo(p).float())
        return _composite(out, self.background, cameras.to(self.vertices.device), height, width)
