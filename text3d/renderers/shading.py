"""Per-sample shading of albedo with a directional light (DreamFusion's albedo / lambertian / textureless)."""

from __future__ import annotations

import torch

SHADING_MODES = ("albedo", "lambertian", "textureless")


def shade(albedo: torch.Tensor, normals: torch.Tensor | None, light_dirs: torch.Tensor | None, mode: str,
          ambient: float = 0.3) -> torch.Tensor:
    """Colours [K,3]: ``albedo`` as is, or ``a * (ambient + (1 - ambient) * max(0, n.l))`` with ``a`` the
    albedo (lambertian) or white (textureless). ``normals`` and ``light_dirs`` are unit [K,3]."""
    if mode == "albedo":
        return albedo
    if mode not in SHADING_MODES:
        raise ValueError(f"unknown shading {mode!r}: expected one of {', '.join(SHADING_MODES)}")
    diffuse = (normals * light_dirs).sum(dim=-1, keepdim=True).clamp_min(0.0)
    lum = ambient + (1.0 - ambient) * diffuse  # [K, 1]
    if mode == "textureless":
        return lum.expand(-1, 3)
    return albedo * lum
