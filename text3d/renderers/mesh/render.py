"""Render a textured triangle mesh from text3d cameras: RGB, opacity, depth and normals like the NeRF."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from text3d.cameras import Cameras
from text3d.renderers.mesh.antialias import antialias as antialias_image
from text3d.renderers.mesh.rasterize import interpolate, project, rasterize, sample_texture
from text3d.renderers.shading import shade


@dataclass
class MeshAsset:
    vertices: torch.Tensor  # [V, 3] world space
    faces: torch.Tensor  # [F, 3] int64
    uvs: Optional[torch.Tensor] = None  # [V, 2]
    texture: Optional[torch.Tensor] = None  # [Ht, Wt, 3] in [0, 1], row 0 = v 1
    vertex_colors: Optional[torch.Tensor] = None  # [V, 3] in [0, 1]

    @classmethod
    def load(cls, path: str | Path) -> "MeshAsset":
        """Read an .obj/.glb (anything trimesh reads) with its UVs and texture or vertex colours."""
        import trimesh

        mesh = trimesh.load(str(path), force="mesh")
        asset = cls(torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32),
                    torch.as_tensor(np.asarray(mesh.faces), dtype=torch.long))
        visual = mesh.visual
        uv = getattr(visual, "uv", None)
        material = getattr(visual, "material", None)
        image = None
        if material is not None:
            image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
        if uv is not None and image is not None:
            asset.uvs = torch.as_tensor(np.asarray(uv), dtype=torch.float32)
            asset.texture = torch.as_tensor(np.array(image.convert("RGB")), dtype=torch.float32) / 255.0
        elif getattr(visual, "vertex_colors", None) is not None:
            asset.vertex_colors = torch.as_tensor(np.asarray(visual.vertex_colors)[:, :3], dtype=torch.float32) / 255.0
        return asset

    def to(self, device: torch.device | str) -> "MeshAsset":
        """The same asset with every tensor on ``device``."""
        return dataclasses.replace(self, **{f.name: None if getattr(self, f.name) is None
                                            else getattr(self, f.name).to(device)
                                            for f in dataclasses.fields(self)})

    def vertex_normals(self) -> torch.Tensor:
        v, f = self.vertices, self.faces
        face_n = torch.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=-1)  # area-weighted
        normals = torch.zeros_like(v).index_add(0, f.reshape(-1), face_n.repeat_interleave(3, dim=0))
        return normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-12)


MESH_BACKENDS = ("auto", "torch", "nvdiffrast")


def resolve_mesh_backend(name: str, device: torch.device) -> str:
    """``auto``: nvdiffrast on CUDA when it is installed, else the pure-PyTorch rasteriser."""
    from text3d.utils.backends import has_nvdiffrast

    if name not in MESH_BACKENDS:
        raise ValueError(f"unknown mesh backend {name!r}; expected one of {', '.join(MESH_BACKENDS)}")
    if name == "auto":
        return "nvdiffrast" if device.type == "cuda" and has_nvdiffrast() else "torch"
    if name == "nvdiffrast" and (device.type != "cuda" or not has_nvdiffrast()):
        raise ValueError("the nvdiffrast backend needs CUDA and the nvdiffrast package (pip install it from its "
                         "GitHub repository); use backend torch")
    return name


def _albedo(asset: MeshAsset, interpolate_fn, texture_fn, B: int, H: int, W: int, device,
            albedo_fn=None) -> torch.Tensor:
    if albedo_fn is not None:
        points = interpolate_fn(asset.vertices)  # [B, H, W, 3]
        return albedo_fn(points.reshape(-1, 3)).reshape(B, H, W, 3)
    if asset.texture is not None and asset.uvs is not None:
        return texture_fn(asset.texture, interpolate_fn(asset.uvs))
    if asset.vertex_colors is not None:
        return interpolate_fn(asset.vertex_colors)
    return torch.full((B, H, W, 3), 0.8, device=device)


def render_mesh(asset: MeshAsset, cameras: Cameras, height: int, width: int, shading: str = "lambertian",
                light_dirs: Optional[torch.Tensor] = None, ambient: float = 0.3,
                background: tuple[float, float, float] = (1.0, 1.0, 1.0), antialias: bool = True,
                backend: str = "auto", albedo_fn=None) -> dict[str, torch.Tensor]:
    """Outputs as the NeRF renderer's: rgb [B,3,H,W], opacity [B,1,H,W], depth [B,1,H,W], normal [B,3,H,W].

    rasterise -> interpolate -> texture -> shade -> composite over ``background`` -> antialias (RGB and
    opacity), differentiable with respect to vertex positions, UVs, vertex colours and the texture.
    ``albedo_fn(points [N, 3]) -> [N, 3]`` (e.g. a hash-grid albedo field) replaces the asset's texture: it is
    evaluated at the interpolated surface point of every covered pixel. ``background=(0, 0, 0)`` gives
    premultiplied colour for compositing over another background.
    """
    device = asset.vertices.device
    cameras = cameras.to(device)
    clip = project(asset.vertices, cameras)
    B = len(cameras)
    normals_v = asset.vertex_normals()
    if resolve_mesh_backend(backend, device) == "nvdiffrast":
        from text3d.renderers.mesh.nvdiffrast_backend import render_nvdiffrast

        albedo, normal, mask, depth, aa = render_nvdiffrast(
            clip, asset.faces, height, width,
            lambda interp, tex: _albedo(asset, interp, tex, B, height, width, device, albedo_fn), normals_v, antialias)
    else:
        rast = rasterize(clip, asset.faces, height, width)

        def interp(attr):
            return interpolate(attr, rast, asset.faces)

        albedo = _albedo(asset, interp, sample_texture, B, height, width, device, albedo_fn)
        normal = interp(normals_v)
        mask, depth = rast.mask.permute(0, 2, 3, 1), rast.depth

        def aa(image):
            return antialias_image(image, rast, clip, asset.faces) if antialias else image

    normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if light_dirs is None:
        light_dirs = cameras.position / cameras.position.norm(dim=-1, keepdim=True)
    light = light_dirs.to(device)[:, None, None, :].expand(B, height, width, 3)
    color = shade(albedo.reshape(-1, 3), normal.reshape(-1, 3), light.reshape(-1, 3), shading, ambient)
    color = color.view(B, height, width, 3)
    bg = torch.tensor(background, dtype=color.dtype, device=device)
    composite = torch.cat([color * mask + bg * (1 - mask), mask], dim=-1)  # [B, H, W, 4]
    composite = aa(composite)
    rgb, opacity = composite[..., :3], composite[..., 3:].clamp(0.0, 1.0)
    return {"rgb": rgb.permute(0, 3, 1, 2), "opacity": opacity.permute(0, 3, 1, 2),
            "depth": depth.unsqueeze(1), "normal": (normal * mask).permute(0, 3, 1, 2)}
