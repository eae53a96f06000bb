"""The nvdiffrast backend of the mesh renderer (CUDA only, imported lazily, CUDA context -- never EGL).

It mirrors the pure-PyTorch path step for step: rasterise -> interpolate -> texture -> antialias,
and returns the same Rasterization-like fields, flipped to text3d's row-0-at-the-top images
(nvdiffrast's row 0 is the bottom, OpenGL's convention).
"""

from __future__ import annotations

import torch

_CONTEXTS: dict = {}


def _context(device: torch.device):
    import nvdiffrast.torch as dr

    key = (device.type, device.index)
    if key not in _CONTEXTS:
        _CONTEXTS[key] = dr.RasterizeCudaContext(device=device)
    return _CONTEXTS[key]


def render_nvdiffrast(clip: torch.Tensor, faces: torch.Tensor, height: int, width: int, albedo_fn, normals_v,
                      antialias: bool = True):
    """(albedo [B,H,W,3], normal [B,H,W,3], mask [B,H,W,1], depth [B,H,W], aa) with ``aa(image [B,H,W,C])``
    antialiasing an image rendered from this rasterisation. ``albedo_fn(interpolate)`` returns per-pixel albedo
    given an ``interpolate(attributes [V, C]) -> [B, H, W, C]`` function and a texture lookup."""
    import nvdiffrast.torch as dr

    tri = faces.to(torch.int32).contiguous()
    clip = clip.contiguous().float()
    rast, _ = dr.rasterize(_context(clip.device), clip, tri, resolution=[height, width])

    def interpolate(attr: torch.Tensor) -> torch.Tensor:
        out, _ = dr.interpolate(attr.contiguous().float(), rast, tri)
        return out

    def texture(tex: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
        # text3d textures have row 0 = v 1; nvdiffrast samples row 0 at v 0
        return dr.texture(tex.flip(0)[None].contiguous(), uv.contiguous(), filter_mode="linear").expand(
            uv.shape[0], -1, -1, -1)

    albedo = albedo_fn(interpolate, texture)
    normal = interpolate(normals_v)
    mask = (rast[..., 3:4] > 0).float()
    depth = interpolate(clip[..., 3:4])[..., 0] * mask[..., 0]  # clip w = distance along the view axis

    def aa(image: torch.Tensor) -> torch.Tensor:
        return dr.antialias(image.contiguous(), rast, clip, tri) if antialias else image

    flip = lambda x: x.flip(1)  # noqa: E731  (bottom-up rows -> top-down)
    return flip(albedo), flip(normal), flip(mask), flip(depth), lambda img: flip(aa(img.flip(1)))
