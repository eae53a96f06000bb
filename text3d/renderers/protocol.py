"""What the 3D loop and the exporter need from a renderer, whatever it draws (a NeRF, a DMTet surface, a
textured mesh): the :class:`Renderer` protocol, its :class:`RenderOutput` and the :class:`ExportSurface` it
hands the exporter.

A render is a dict (:class:`RenderOutput`) holding at least ``"rgb"`` and ``"opacity"`` images [B, C, H, W];
a renderer may add images (``"depth"``, ``"normal"``) and scalar *regularisers*, losses of its own that the
trainer adds with a weight: ``"opacity_sparsity"`` and ``"orientation_loss"`` (weighted by ``train.*``) and
any keys a stage's registry entry names in ``StageKind.regularisers`` (the geometry stage's
``"laplacian"`` and ``"normal_consistency"``, weighted by its ``geometry.lambda_*``).

For export and for the stage after it, every renderer has a surface: :meth:`Renderer.surface` is the
triangle mesh the next stage starts from (a NeRF's is its marching-cubes mesh, through
:func:`text3d.export.extract_mesh`), :meth:`Renderer.export_surface` the cleaned mesh and the colour to bake
into its texture, as written to the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypedDict, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    import trimesh

    from text3d.cameras import Cameras
    from text3d.export import ExportConfig
    from text3d.renderers.dmtet import SurfaceMesh

ColourFn = Callable[[torch.Tensor], torch.Tensor]  # world points [N, 3] -> colours [N, 3] in [0, 1]


class _RenderImages(TypedDict):
    rgb: torch.Tensor  # [B, 3, H, W] in [0, 1], composited over the background
    opacity: torch.Tensor  # [B, 1, H, W] accumulated opacity


class RenderOutput(_RenderImages, total=False):
    """One render: ``rgb`` and ``opacity`` always, the rest when the renderer has them."""

    depth: torch.Tensor  # [B, 1, H, W]
    normal: torch.Tensor  # [B, 3, H, W] opacity-weighted world normals
    # scalar regularisers
    opacity_sparsity: torch.Tensor  # mean opacity (train.lambda_sparsity)
    orientation_loss: torch.Tensor  # normals facing away from the camera (train.lambda_orientation)
    laplacian: torch.Tensor  # geometry stage: uniform-Laplacian smoothness of the surface
    normal_consistency: torch.Tensor  # geometry stage: adjacent face normals agree


@runtime_checkable
class ColourField(Protocol):
    """A field whose albedo colours a surface (a NeRF's hash-grid field)."""

    def query_albedo(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ExportSurface:
    """What the exporter unwraps and bakes: a welded mesh with small floating pieces dropped, and its colour."""

    mesh: "trimesh.Trimesh"
    colour: ColourFn


@runtime_checkable
class Renderer(Protocol):
    """A stage's differentiable asset (an ``nn.Module``): renders cameras, has a background and a surface.

    Implemented by :class:`~text3d.renderers.nerf.NeRFRenderer` and the mesh-stage models of
    :mod:`text3d.renderers.mesh_stages`; a plug-in stage's models implement it too.
    """

    background: nn.Module

    def __call__(self, cameras: "Cameras", height: int, width: int, shading: str = ..., light_dirs: Any = None,
                 ambient: float = 0.3, **kwargs: Any) -> RenderOutput: ...

    def update_occupancy(self, step: int) -> None:
        """Called before every training step (a NeRF refreshes its occupancy grid; a mesh does nothing)."""

    def anneal(self, progress: float) -> None:
        """Called before every training step with the fraction of the stage's steps done before it (a NeRF fades
        its centre blob; a mesh does nothing)."""

    def surface(self, export: "ExportConfig | None" = None) -> "SurfaceMesh":
        """The asset's triangle surface, on its device; ``export`` settings for renderers that extract it."""

    def colour_field(self) -> ColourField:
        """The field whose ``query_albedo`` colours :meth:`surface`."""

    def export_surface(self, export: "ExportConfig") -> ExportSurface:
        """The mesh and colour the exporter writes (``export.bake``, ``export.min_component_fraction``...)."""

    # nn.Module's own methods used by the trainer: parameters(), state_dict(), load_state_dict(), train(), eval()
    def parameters(self, recurse: bool = True) -> Any: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> Any: ...


__all__ = ["ColourField", "ColourFn", "ExportSurface", "RenderOutput", "Renderer"]
