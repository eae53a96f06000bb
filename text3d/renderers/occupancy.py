"""Occupancy grid over the scene cube: which cells may hold density, so empty space is never queried.

The grid keeps, per cell, a decaying running maximum of the density seen at one jittered point of the
cell per update (``d <- max(decay * d, density(x_jittered))``; the first update stores the densities
directly). A cell is occupied when its value exceeds ``min(density_threshold, mean of all cells)`` (the
mean keeps a nearly empty field from being culled entirely). Before the first update every cell is
occupied. Everything lives in registered buffers, so the grid is part of ``state_dict``.
Cell ``[i, j, k]`` covers x, y, z ascending over ``[-bound, bound]``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class OccupancyGrid(nn.Module):
    def __init__(self, resolution: int = 32, bound: float = 1.0, decay: float = 0.95):
        super().__init__()
        self.resolution, self.bound, self.decay = int(resolution), float(bound), float(decay)
        r = self.resolution
        self.register_buffer("density", torch.zeros(r, r, r))
        self.register_buffer("mask", torch.ones(r, r, r, dtype=torch.bool))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def cell_index(self, x: torch.Tensor) -> torch.Tensor:
        """Flat cell index [N] (``i*R*R + j*R + k``) of points [N, 3]; points outside are clamped to the border."""
        r = self.resolution
        xt = x.t()  # coordinate-major: contiguous when x is a transposed [3, N] tensor
        ijk = ((xt + self.bound) * (r / (2.0 * self.bound))).floor_().clamp_(0, r - 1).to(torch.int32)
        return ((ijk[0] * r + ijk[1]) * r + ijk[2]).long()

    def occupied(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean [N]: the cell of each point may hold density."""
        return self.mask.view(-1).index_select(0, self.cell_index(x))

    def cell_points(self, jitter: bool) -> torch.Tensor:
        """One point per cell [R^3, 3] in flat-index order: the centre, or uniform inside the cell (global RNG)."""
        r, dev = self.resolution, self.density.device
        ar = torch.arange(r, device=dev, dtype=torch.float32)
        ijk = torch.stack(torch.meshgrid(ar, ar, ar, indexing="ij"), dim=-1).view(-1, 3)
        ijk = ijk + (torch.rand(ijk.shape, device=dev) if jitter else 0.5)
        return ijk * (2.0 * self.bound / r) - self.bound

    @torch.no_grad()
    def update(self, density_fn: Callable[[torch.Tensor], torch.Tensor], density_threshold: float,
               chunk: int = 65536) -> None:
        """Refresh the running maximum and the mask from ``density_fn(x [N,3]) -> [N]`` at jittered points."""
        pts = self.cell_points(jitter=True)
        fresh = torch.cat([density_fn(p).float().reshape(-1) for p in pts.split(chunk)]).view_as(self.density)
        fresh = torch.nan_to_num(fresh, nan=0.0, posinf=1e6, neginf=0.0)
        if bool(self.initialized):
            fresh = torch.maximum(self.density * self.decay, fresh)
        self.density.copy_(fresh)
        self.initialized.fill_(True)
        threshold = min(float(density_threshold), float(self.density.mean()))
        self.mask.copy_(self.density > threshold)

    def occupied_fraction(self) -> float:
        return float(self.mask.float().mean())
