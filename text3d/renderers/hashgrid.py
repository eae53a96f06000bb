"""Multiresolution hash-grid encoding (Instant-NGP style) in pure PyTorch, with an optional tiny-cuda-nn twin.

Level ``l`` has ``res_l = floor(base * growth**l)`` vertices per axis (``growth`` chosen so the last level has
``max_resolution``); a point ``x`` in ``[-bound, bound]^3`` maps to the continuous vertex coordinate
``(x + bound) / (2 bound) * (res_l - 1)``. Its feature is the trilinear interpolation of the 8 surrounding
vertices' table rows. A level whose dense grid ``res_l^3`` fits in ``2**log2_hashmap_size`` rows is indexed
densely (``i + j res + k res^2``); finer levels use the spatial hash ``(i*1 ^ j*2654435761 ^ k*805459861) mod T``.
All levels live in one parameter table and every level's 8 corners are read with one gather (indices are
built level- and corner-major, fully vectorised, no Python loop over points or levels).
:meth:`HashGridEncoding.forward_with_jacobian` also returns the exact spatial Jacobian from the same corners
(analytic normals without double backward). CPU speed notes: 2-feature rows move as complex64 numbers, and
no elementwise op broadcasts along the tiny feature axis.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

PRIMES = (1, 2654435761, 805459861)


class _GatherRows(torch.autograd.Function):
    """``table[idx]`` for a [T, 2] float32 table, gathered as complex64 (one 8-byte load per row) and
    scattered back in the backward pass with a 1-D ``index_add_`` (several times faster than the
    generic 2-D ``index_select`` backward on CPU). Differentiable to any order through ``_ScatterRows``."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.n_rows = table.shape[0]
        return _gather(table, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        return _ScatterRows.apply(grad, idx, ctx.n_rows), None


class _ScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, idx: torch.Tensor, n_rows: int) -> torch.Tensor:
        ctx.save_for_backward(idx)
        return _scatter_add(values, idx, n_rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        return _GatherRows.apply(grad, idx), None, None


def _as_pairs(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.shape[-1] == 2


def _gather(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if _as_pairs(table):
        return torch.view_as_real(torch.view_as_complex(table.contiguous()).index_select(0, idx))
    return table.index_select(0, idx)


def _scatter_add(values: torch.Tensor, idx: torch.Tensor, n_rows: int) -> torch.Tensor:
    values = values.contiguous()
    if _as_pairs(values):
        out = torch.zeros(n_rows, dtype=torch.complex64, device=values.device)
        return torch.view_as_real(out.index_add_(0, idx, torch.view_as_complex(values)))
    out = torch.zeros(n_rows, values.shape[1], dtype=values.dtype, device=values.device)
    return out.index_add_(0, idx, values)


def _spread(t: torch.Tensor, n_feat: int) -> torch.Tensor:
    """[..., M] -> contiguous [..., M, n_feat] with the value repeated along the last axis (for two
    features through ``torch.complex``, much faster than materialising a broadcast)."""
    if n_feat == 2 and t.dtype == torch.float32:
        return torch.view_as_real(torch.complex(t, t))
    return t.unsqueeze(-1).expand(*t.shape, n_feat).contiguous()


def gather_rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` ([T, F] -> [N, F]) with a fast, differentiable CPU path."""
    return _GatherRows.apply(table, idx)


class _HashInterp(torch.autograd.Function):
    """``out[k, m] = sum_c weights[k, c, m] * table[idx[c, m]]``: K weighted sums of the same gathered rows.

    Corner-major layout ([8, M] indices and weights) keeps every elementwise op contiguous and vectorised;
    2-feature rows are handled as complex64 numbers (one 8-byte load per row). The backward pass scatters
    all K row gradients into the table with a single ``index_add``; both passes are differentiable ops."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(table, idx, weights)
        return _interp(table, idx, weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        table, idx, weights = ctx.saved_tensors
        grad_table = grad_weights = None
        if ctx.needs_input_grad[0]:
            if _as_pairs(table):
                gc = torch.view_as_complex(grad.contiguous())  # [K, M]
                rows = (weights * gc.unsqueeze(1)).sum(0)  # [8, M] complex
                rows = torch.view_as_real(rows).view(-1, 2)
            else:
                rows = (weights.unsqueeze(-1) * grad.unsqueeze(1)).sum(0).view(-1, table.shape[1])
            grad_table = _ScatterRows.apply(rows, idx.reshape(-1), table.shape[0])
        if ctx.needs_input_grad[2]:
            feats = gather_rows(table, idx.reshape(-1)).view(*idx.shape, table.shape[1])  # [8, M, F]
            grad_weights = (feats.unsqueeze(0) * grad.unsqueeze(1)).sum(-1)  # [K, 8, M]
        return grad_table, None, grad_weights


def _interp(table: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    if _as_pairs(table):
        feats = torch.view_as_complex(table.contiguous()).index_select(0, idx.reshape(-1)).view(idx.shape)
        return torch.view_as_real(torch.stack([(feats * w).sum(0) for w in weights]))
    feats = table.index_select(0, idx.reshape(-1)).view(*idx.shape, table.shape[1])
    return torch.stack([(feats * w.unsqueeze(-1)).sum(0) for w in weights])


def hash_interp(table: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[T, F] table, [8, M] row indices, [K, 8, M] weights -> [K, M, F] weighted row sums."""
    return _HashInterp.apply(table, idx, weights)


class _HashTrilinear(torch.autograd.Function):
    """Fast path when only the table needs gradients: trilinear interpolation (and optionally its spatial
    Jacobian) as three separable lerps over the gathered corner rows, with a hand-written backward that
    scatters one combined row gradient. ``frac`` [3, M] are the per-axis fractional positions and ``dpos``
    [3, M] the per-axis ``d frac / d x`` (None: no Jacobian). Output [K, M, F]: K = 1, or 4 with the
    Jacobian (value, d/dx, d/dy, d/dz). Weights are expanded to [.., M, F] so that no op broadcasts along
    the tiny feature axis (that is several times slower on CPU); ``torch.lerp`` on real tensors is exact at
    both ends, so values at grid vertices are the table entries."""

    @staticmethod
    def forward(ctx, table, idx, frac, dpos):
        ctx.save_for_backward(idx, frac, dpos)
        n_rows, n_feat, m = table.shape[0], table.shape[1], idx.shape[1]
        ctx.n_rows = n_rows
        f = _gather(table, idx.reshape(-1)).view(2, 2, 2, m, n_feat)
        tx, ty, tz = _spread(frac, n_feat)
        out = torch.empty(1 if dpos is None else 4, m, n_feat, dtype=f.dtype, device=f.device)
        fz = torch.lerp(f[:, :, 0], f[:, :, 1], tz)  # [2, 2, M, F]
        fzy = torch.lerp(fz[:, 0], fz[:, 1], ty)  # [2, M, F]
        torch.lerp(fzy[0], fzy[1], tx, out=out[0])
        if dpos is not None:
            dx, dy, dz = _spread(dpos, n_feat)
            torch.mul(fzy[1] - fzy[0], dx, out=out[1])
            gy = fz[:, 1] - fz[:, 0]
            torch.mul(torch.lerp(gy[0], gy[1], tx), dy, out=out[2])
            gz = f[:, :, 1] - f[:, :, 0]
            gzy = torch.lerp(gz[:, 0], gz[:, 1], ty)
            torch.mul(torch.lerp(gzy[0], gzy[1], tx), dz, out=out[3])
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        idx, frac, dpos = ctx.saved_tensors
        g = grad.contiguous()  # [K, M, F]
        m, n_feat = g.shape[1], g.shape[2]
        w = _spread(torch.stack([1.0 - frac, frac], dim=1), n_feat)
        wx, wy, wz = w  # [2, M, F] (lower, upper) weights per axis
        g_fzy = wx * g[0]  # [2, M, F]
        if dpos is not None:
            dx, dy, dz = _spread(dpos, n_feat)
            gx = g[1] * dx
            g_fzy[0] -= gx
            g_fzy[1] += gx
        g_fz = g_fzy[:, None] * wy[None]  # [2, 2, M, F]
        if dpos is not None:
            gy = wx * (g[2] * dy)
            g_fz[:, 0] -= gy
            g_fz[:, 1] += gy
        if dpos is None:
            g_f = g_fz[:, :, None] * wz[None, None]  # [2, 2, 2, M, F]
        else:
            gz = (wx[:, None] * wy[None]) * (g[3] * dz)  # [2, 2, M, F]
            g_f = torch.empty(2, 2, 2, m, n_feat, dtype=g.dtype, device=g.device)
            torch.sub(g_fz * wz[0], gz, out=g_f[:, :, 0])
            torch.add(g_fz * wz[1], gz, out=g_f[:, :, 1])
        return _scatter_add(g_f.view(-1, n_feat), idx.reshape(-1), ctx.n_rows), None, None, None


def level_resolutions(n_levels: int, base_resolution: int, max_resolution: int) -> list[int]:
    """Vertices per axis of each level, geometric from ``base_resolution`` to ``max_resolution``."""
    if n_levels < 1 or base_resolution < 2 or max_resolution < base_resolution:
        raise ValueError("hash grid needs n_levels >= 1 and 2 <= base_resolution <= max_resolution")
    if n_levels == 1:
        return [base_resolution]
    growth = math.exp((math.log(max_resolution) - math.log(base_resolution)) / (n_levels - 1))
    return [int(math.floor(base_resolution * growth**level + 1e-6)) for level in range(n_levels)]


class HashGridEncoding(nn.Module):
    """Pure-PyTorch multiresolution hash encoding: ``forward(x [N,3]) -> [N, n_levels * n_features_per_level]``.

    ``embeddings`` holds every level's rows: dense levels first (``res^3`` rows each), then, starting at a
    multiple of ``T = 2**log2_hashmap_size``, one block of ``T`` rows per hashed level (the few padding rows
    in between are never read). ``level_offsets[l]`` is the first row of level ``l``."""

    def __init__(self, n_levels: int = 8, n_features_per_level: int = 2, log2_hashmap_size: int = 16,
                 base_resolution: int = 16, max_resolution: int = 256, bound: float = 1.0):
        super().__init__()
        self.n_levels, self.n_features = n_levels, n_features_per_level
        self.log2_hashmap_size, self.bound = log2_hashmap_size, float(bound)
        self.resolutions = level_resolutions(n_levels, base_resolution, max_resolution)
        self.hashmap_size = hashmap_size = 2**log2_hashmap_size
        self.dense_levels = d = sum(1 for r in self.resolutions if r**3 <= hashmap_size)  # a prefix: res grows
        self.output_dim = n_levels * n_features_per_level
        offsets, total = [], 0
        for level, res in enumerate(self.resolutions):
            if level == d:  # align the hashed blocks so "offset + h" == "offset ^ h" for h < T
                total = -(-total // hashmap_size) * hashmap_size
            offsets.append(total)
            total += res**3 if level < d else hashmap_size
        self.level_offsets = offsets
        self.embeddings = nn.Parameter(torch.empty(total, n_features_per_level).uniform_(-1e-4, 1e-4))
        # int32 index arithmetic is exact while coordinate * (prime mod T) stays below 2^31
        coord_bits = max(1, math.ceil(math.log2(max(self.resolutions) + 1)))
        wide = coord_bits + log2_hashmap_size > 30 or total >= 2**31
        self._index_dtype = torch.int64 if wide else torch.int32
        mask = hashmap_size - 1
        mult = [[1, r, r * r] for r in self.resolutions[:d]] + [[p & mask for p in PRIMES]] * (n_levels - d)
        self.register_buffer("_scale", torch.tensor(self.resolutions, dtype=torch.float32) - 1.0, persistent=False)
        self.register_buffer("_mult", torch.tensor(mult, dtype=self._index_dtype), persistent=False)  # [L, 3]
        self.register_buffer("_offsets", torch.tensor(offsets, dtype=self._index_dtype), persistent=False)

    def extra_repr(self) -> str:
        return (f"levels={self.resolutions}, features={self.n_features}, dense_levels={self.dense_levels}, "
                f"hashmap=2^{self.log2_hashmap_size}, rows={self.embeddings.shape[0]}")

    def _locate(self, x: torch.Tensor):
        """Corner rows [8, L*N] (corner-major, then level, then point), fractional positions inside the cell
        [3, L, N] and whether each coordinate was inside the box [3, N]."""
        n, nl, d = x.shape[0], self.n_levels, self.dense_levels
        x01 = (x.t().contiguous() + self.bound) * (0.5 / self.bound)  # [3, N]; contiguous keeps ops vectorised
        inside = (x01 >= 0.0) & (x01 <= 1.0)
        pos = x01.clamp(0.0, 1.0).unsqueeze(1) * self._scale[None, :, None]  # [3, L, N]
        base = torch.minimum(pos.floor(), (self._scale - 1.0)[None, :, None])
        frac = pos - base
        mult = self._mult.t().unsqueeze(-1)  # [3, L, 1]
        lower = base.to(self._index_dtype) * mult
        term = torch.stack([lower, lower + mult], dim=1)  # [3, 2, L, N]: corner coordinate * multiplier
        idx = torch.empty(2, 2, 2, nl, n, dtype=self._index_dtype, device=x.device)
        if d > 0:  # i + j r + k r^2 + offset
            tx = term[0, :, :d] + self._offsets[:d, None]
            txy = tx[:, None] + term[1, None, :, :d]
            torch.add(txy[:, :, None], term[2, None, None, :, :d], out=idx[:, :, :, :d])
        if d < nl:  # offset ^ ((i p0 ^ j p1 ^ k p2) mod T); the offset is a multiple of T
            th = term[:, :, d:] & (self.hashmap_size - 1)
            tx = th[0] ^ self._offsets[d:, None]
            txy = tx[:, None] ^ th[1, None]
            torch.bitwise_xor(txy[:, :, None], th[2, None, None], out=idx[:, :, :, d:])
        return idx.view(8, nl * n), frac, inside

    @staticmethod
    def _outer(wx: torch.Tensor, wy: torch.Tensor, wz: torch.Tensor) -> torch.Tensor:
        """Per-axis [2, ...] factors -> [8, ...] corner products (corner c = 4 bx + 2 by + bz)."""
        return (wx[:, None] * wy[None, :]).unsqueeze(2).mul(wz[None, None, :]).flatten(0, 2)

    def corner_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row indices [8, L*N] and trilinear weights [8, L*N] of every level's 8 corners
        (corner c has offsets ``(c >> 2 & 1, c >> 1 & 1, c & 1)`` along x, y, z; column ``l * N + n``)."""
        idx, frac, _ = self._locate(x)
        w = torch.stack([1.0 - frac, frac], dim=1)  # [3, 2, L, N]
        return idx, self._outer(w[0], w[1], w[2]).view(idx.shape)

    def _to_points(self, out: torch.Tensor, n: int) -> torch.Tensor:
        """[K, L*N, F] -> [K, N, L*F] (level-major features per point). With 2 features the transpose runs on
        complex64 numbers: moving 8-byte elements is several times faster than pairs of floats."""
        k = out.shape[0]
        if _as_pairs(out):
            out = torch.view_as_complex(out.contiguous()).view(k, self.n_levels, n).transpose(1, 2).contiguous()
            return torch.view_as_real(out).view(k, n, self.output_dim)
        return out.view(k, self.n_levels, n, self.n_features).transpose(1, 2).reshape(k, n, self.output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # gradients w.r.t. x as well: generic path
            idx, w = self.corner_weights(x)
            out = hash_interp(self.embeddings, idx, w.unsqueeze(0))
        else:
            idx, frac, _ = self._locate(x)
            out = _HashTrilinear.apply(self.embeddings, idx, frac.view(3, -1), None)
        return self._to_points(out, x.shape[0])[0]

    def forward_with_jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoding [N, D] and its exact spatial Jacobian [3, N, D] (``d enc / d x_a``), both differentiable
        w.r.t. the table. The Jacobian reads the same corners with the derivative of the trilinear weights,
        scaled by ``d frac / d x = (res - 1) / (2 bound)`` (0 for a coordinate clamped to the box)."""
        n = x.shape[0]
        idx, frac, inside = self._locate(x)
        dpos = inside.to(x.dtype)[:, None, :] * (self._scale / (2.0 * self.bound))[None, :, None]  # [3, L, N]
        if x.requires_grad and torch.is_grad_enabled():
            wx, wy, wz = torch.stack([1.0 - frac, frac], dim=1)
            slope = torch.tensor([-1.0, 1.0], dtype=x.dtype, device=x.device).view(2, 1, 1)
            weights = torch.stack([self._outer(wx, wy, wz), self._outer(slope * dpos[0], wy, wz),
                                   self._outer(wx, slope * dpos[1], wz), self._outer(wx, wy, slope * dpos[2])])
            out = hash_interp(self.embeddings, idx, weights.view(4, 8, -1))
        else:
            out = _HashTrilinear.apply(self.embeddings, idx, frac.view(3, -1), dpos.view(3, -1))
        out = self._to_points(out, n)
        return out[0], out[1:]


class TCNNHashGridEncoding(nn.Module):
    """The same encoding through tiny-cuda-nn (CUDA only). Its table layout differs from
    :class:`HashGridEncoding`, so checkpoints do not move between the two backends."""

    def __init__(self, n_levels: int, n_features_per_level: int, log2_hashmap_size: int, base_resolution: int,
                 max_resolution: int, bound: float):
        super().__init__()
        import tinycudann as tcnn  # lazy: optional CUDA extension

        growth = math.exp((math.log(max_resolution) - math.log(base_resolution)) / max(n_levels - 1, 1))
        self.bound = float(bound)
        self.output_dim = n_levels * n_features_per_level
        config = {"otype": "HashGrid", "n_levels": n_levels, "n_features_per_level": n_features_per_level,
                  "log2_hashmap_size": log2_hashmap_size, "base_resolution": base_resolution,
                  "per_level_scale": growth}
        try:
            self.encoding = tcnn.Encoding(n_input_dims=3, encoding_config=config, dtype=torch.float32)
        except TypeError:  # older tiny-cuda-nn without the dtype argument (half precision output)
            self.encoding = tcnn.Encoding(n_input_dims=3, encoding_config=config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x01 = ((x + self.bound) * (0.5 / self.bound)).clamp(0.0, 1.0)
        return self.encoding(x01).float()
