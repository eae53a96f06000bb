"""Differentiable renderers g(theta, camera) of a 3D asset: a hash-grid NeRF and the mesh stages' models, all
implementing :class:`~text3d.renderers.protocol.Renderer`."""

from text3d.renderers.background import Background
from text3d.renderers.field import NeRFField
from text3d.renderers.hashgrid import HashGridEncoding
from text3d.renderers.nerf import NeRFConfig, NeRFRenderer
from text3d.renderers.occupancy import OccupancyGrid
from text3d.renderers.protocol import ExportSurface, RenderOutput, Renderer
from text3d.renderers.shading import SHADING_MODES, shade

__all__ = ["Background", "ExportSurface", "HashGridEncoding", "NeRFConfig", "NeRFField", "NeRFRenderer",
           "OccupancyGrid", "RenderOutput", "Renderer", "SHADING_MODES", "shade"]
