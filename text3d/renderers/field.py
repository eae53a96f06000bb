"""The radiance field: hash-grid encoding -> tiny MLP -> density (with DreamFusion's centre blob) and albedo.

``density = act(raw + s * blob_density * (1 - |x| / blob_radius))`` with ``act`` softplus or truncated exp,
``albedo = sigmoid(mlp_rgb)``. The blob is a prior for the start of training: dense at the centre, thin beyond
``blob_radius``, it makes every early shape a ball. Kept to the end it costs the corners of a cube (at
``|x| = 0.59`` the world's cube gets ``-1.8`` where its faces get ``+3.2``) and fills the hole of a torus (``+10`` at
the centre); ``s`` (``blob_scale``, a buffer saved with the field, 1 by default) lets training fade it out
(:meth:`text3d.renderers.nerf.NeRFRenderer.anneal`). Normals are ``-grad(density) / |grad(density)|``: ``analytic`` (exact, from the
hash grid's closed-form spatial Jacobian and a hand-written MLP vector-Jacobian product; differentiable w.r.t.
the parameters without double backward), ``autograd`` (the same value through ``torch.autograd.grad`` with
``create_graph``; reference/fallback, used with tiny-cuda-nn) or ``finite_difference`` (central
differences). The gradient is taken of the pre-activation value: the same direction, because both
activations are strictly increasing, and well conditioned where softplus saturates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from text3d.renderers.hashgrid import HashGridEncoding, TCNNHashGridEncoding


class _TruncExp(torch.autograd.Function):
    """exp(x) whose gradient uses exp(min(x, 15)), so huge raw densities cannot explode the update."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))  # differentiable, so double backward works


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


DENSITY_ACTIVATIONS = {"softplus": F.softplus, "exp": trunc_exp}


class MLP(nn.Module):
    """``n_hidden_layers`` ReLU layers of ``hidden_dim`` units and a linear output."""

    def __init__(self, in_dim: int, hidden_dim: int, n_hidden_layers: int, out_dim: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * n_hidden_layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            h = torch.relu(layer(h))
        return self.out(h)

    def forward_with_input_grad(self, h: torch.Tensor, channel: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs [N, out] and ``d out[:, channel] / d h`` [N, in] (a hand-written vector-Jacobian product,
        differentiable w.r.t. the weights and ``h``)."""
        masks = []
        for layer in self.hidden:
            pre = layer(h)
            masks.append(pre > 0)
            h = torch.relu(pre)
        out = self.out(h)
        g = self.out.weight[channel].expand(h.shape[0], -1)
        for layer, mask in zip(reversed(self.hidden), reversed(masks)):
            g = (g * mask) @ layer.weight
        return out, g


class NeRFField(nn.Module):
    """``query_density(x [N,3]) -> [N]`` and ``query_albedo(x [N,3]) -> [N,3]`` in [0, 1]."""

    def __init__(self, bound: float = 1.0, n_levels: int = 8, n_features_per_level: int = 2,
                 log2_hashmap_size: int = 16, base_resolution: int = 16, max_resolution: int = 256,
                 hidden_dim: int = 32, n_hidden_layers: int = 1, density_activation: str = "softplus",
                 blob_density: float = 10.0, blob_radius: float = 0.5, use_tcnn: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        if density_activation not in DENSITY_ACTIVATIONS:
            raise ValueError(f"density_activation must be one of {sorted(DENSITY_ACTIVATIONS)}, "
                             f"got {density_activation!r}")
        self.bound, self.blob_density, self.blob_radius = float(bound), float(blob_density), float(blob_radius)
        self.density_activation = density_activation
        self.activation = DENSITY_ACTIVATIONS[density_activation]
        enc_args = (n_levels, n_features_per_level, log2_hashmap_size, base_resolution, max_resolution, bound)
        self.encoding = TCNNHashGridEncoding(*enc_args) if use_tcnn else HashGridEncoding(*enc_args)
        self.mlp = MLP(self.encoding.output_dim, hidden_dim, n_hidden_layers, 4)
        self.register_buffer("blob_scale", torch.ones(()))  # the blob's current strength (module docstring)
        # finite-difference step: half a cell of the finest level
        self.fd_eps = float(bound) / max_resolution
        if device is not None:
            self.to(device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # fields saved before the blob could fade have no blob_scale: theirs was always 1
        state_dict.setdefault(prefix + "blob_scale", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _radius(x: torch.Tensor) -> torch.Tensor:
        return (x * x).sum(dim=-1).add(1e-12).sqrt()  # smooth at the origin

    def blob(self, x: torch.Tensor, radius: torch.Tensor | None = None) -> torch.Tensor:
        """DreamFusion's density bias ``blob_density * (1 - |x| / blob_radius)`` [N]."""
        radius = self._radius(x) if radius is None else radius
        return (self.blob_scale * self.blob_density) * (1.0 - radius / self.blob_radius)

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-activation density (blob included) [N] and pre-sigmoid albedo [N,3]."""
        h = self.mlp(self.encoding(x))
        return h[:, 0] + self.blob(x), h[:, 1:]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre, rgb = self.raw(x)
        return self.activation(pre), torch.sigmoid(rgb)

    def query_density(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.raw(x)[0])

    def query_albedo(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.raw(x)[1])

    def forward_with_normals(self, x: torch.Tensor, method: str = "analytic",
                             create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Density [N], albedo [N,3] and unit outward normals [N,3] (``method``: see the module docstring).

        With ``create_graph`` (training) the normals are differentiable w.r.t. the parameters; otherwise they
        are detached. ``analytic`` falls back to ``autograd`` for an encoding without a closed-form Jacobian."""
        if method == "analytic" and not hasattr(self.encoding, "forward_with_jacobian"):
            method = "autograd"
        if method == "analytic":
            enc, jac = self.encoding.forward_with_jacobian(x)  # [N, D], [3, N, D]
            h, g_enc = self.mlp.forward_with_input_grad(enc, channel=0)
            radius = self._radius(x)
            pre = h[:, 0] + self.blob(x, radius)
            blob_grad = x * (-(self.blob_scale * self.blob_density) / self.blob_radius / radius).unsqueeze(-1)
            grad = (jac * g_enc.unsqueeze(0)).sum(-1).t() + blob_grad
            sigma, albedo = self.activation(pre), torch.sigmoid(h[:, 1:])
            if not create_graph:
                grad = grad.detach()
            return sigma, albedo, -F.normalize(grad, dim=-1, eps=1e-20)
        if method == "finite_difference":
            sigma, albedo = self(x)
            eps = self.fd_eps
            offsets = torch.eye(3, dtype=x.dtype, device=x.device) * eps
            probes = torch.cat([x[None] + offsets[:, None], x[None] - offsets[:, None]], dim=0)  # [6, N, 3]
            pre = self.raw(probes.reshape(-1, 3))[0].view(2, 3, -1)
            grad = ((pre[0] - pre[1]) / (2.0 * eps)).t()
            if not create_graph:
                grad = grad.detach()
            return sigma, albedo, -F.normalize(grad, dim=-1, eps=1e-20)
        if method != "autograd":
            raise ValueError(f"normals must be analytic, autograd or finite_difference, got {method!r}")
        outer_grad = torch.is_grad_enabled()
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            pre, rgb = self.raw(xg)
            (grad,) = torch.autograd.grad(pre.sum(), xg, create_graph=create_graph and outer_grad)
        normals = -F.normalize(grad, dim=-1, eps=1e-20)
        sigma, albedo = self.activation(pre), torch.sigmoid(rgb)
        if not outer_grad:
            sigma, albedo = sigma.detach(), albedo.detach()
        return sigma, albedo, normals
