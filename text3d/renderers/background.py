"""Background colour behind the scene: a learned function of the view direction, or a solid colour."""

from __future__ import annotations

import math

import torch
from torch import nn


class Background(nn.Module):
    """``forward(dirs [N,3], color=None) -> [N,3]`` in [0, 1].

    ``learned``: fixed Fourier features of the unit direction (``d, sin(2^k pi d), cos(2^k pi d)``) -> one
    hidden ReLU layer -> sigmoid. ``solid``: the configured colour. ``color`` ([3], or [N,3]) overrides both.
    """

    def __init__(self, mode: str = "learned", color: tuple[float, float, float] = (1.0, 1.0, 1.0),
                 n_frequencies: int = 3, hidden_dim: int = 16):
        super().__init__()
        if mode not in ("learned", "solid"):
            raise ValueError(f"background must be 'learned' or 'solid', got {mode!r}")
        self.mode = mode
        self.register_buffer("color", torch.tensor([float(c) for c in color], dtype=torch.float32), persistent=False)
        self.register_buffer("freqs", (2.0 ** torch.arange(n_frequencies, dtype=torch.float32)) * math.pi,
                             persistent=False)
        if mode == "learned":
            in_dim = 3 + 6 * n_frequencies
            self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, 3))

    def encode(self, dirs: torch.Tensor) -> torch.Tensor:
        angles = (dirs.unsqueeze(-1) * self.freqs).flatten(-2)  # [N, 3F]
        return torch.cat([dirs, torch.sin(angles), torch.cos(angles)], dim=-1)

    def forward(self, dirs: torch.Tensor, color: torch.Tensor | None = None) -> torch.Tensor:
        n = dirs.shape[0]
        if color is not None:
            color = torch.as_tensor(color, dtype=dirs.dtype, device=dirs.device)
            return color.expand(n, 3) if color.dim() == 1 else color.reshape(n, 3)
        if self.mode == "solid":
            return self.color.to(dirs.dtype).expand(n, 3)
        return torch.sigmoid(self.net(self.encode(dirs)))
