"""Render a textured triangle mesh from text3d cameras: RGB, opacity, depth and normals like the NeRF."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from text3d.cameras import Cameras
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

    def vertex_normals(self) -> torch.Tensor:
        v, f = self.vertices, self.faces
        face_n = torch.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=-1)  # area-weighted
        normals = torch.zeros_like(v).index_add(0, f.reshape(-1), face_n.repeat_interleave(3, dim=0))
        return normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def render_mesh(asset: MeshAsset, cameras: Cameras, height: int, width: int, shading: str = "lambertian",
                light_dirs: Optional[torch.Tensor] = None, ambient: float = 0.3,
                background: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict[str, torch.Tensor]:
    """Outputs as the NeRF renderer's: rgb [B,3,H,W], opacity [B,1,H,W], depth [B,1,H,W], normal [B,3,H,W]."""
    device = asset.vertices.device
    clip = project(asset.vertices, cameras.to(device))
    rast = rasterize(clip, asset.faces, height, width)
    B = len(cameras)
    if asset.texture is not None and asset.uvs is not None:
        uv = interpolate(asset.uvs, rast, asset.faces)
        albedo = sample_texture(asset.texture, uv)
    elif asset.vertex_colors is not None:
        albedo = interpolate(asset.vertex_colors, rast, asset.faces)
    else:
        albedo = torch.full((B, height, width, 3), 0.8, device=device)
    normal = interpolate(asset.vertex_normals(), rast, asset.faces)
    normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if light_dirs is None:
        light_dirs = cameras.position.to(device) / cameras.position.to(device).norm(dim=-1, keepdim=True)
    light = light_dirs.to(device)[:, None, None, :].expand(B, height, width, 3)
    color = shade(albedo.reshape(-1, 3), normal.reshape(-1, 3), light.reshape(-1, 3), shading, ambient)
    mask = rast.mask  # [B,1,H,W]
    color = color.view(B, height, width, 3).permute(0, 3, 1, 2)
    bg = torch.tensor(background, dtype=color.dtype, device=device).view(1, 3, 1, 1)
    return {"rgb": color * mask + bg * (1 - mask), "opacity": mask, "depth": rast.depth.unsqueeze(1),
            "normal": normal.permute(0, 3, 1, 2) * mask}
