"""Volume rendering of rays through the scene cube: AABB clipping, occupancy-culled sampling, compositing.

Every ray is clipped to ``[-bound, bound]^3`` and its segment ``[t_near, t_far]`` cut into ``num_samples``
equal bins of width ``delta``; a sample sits at the bin's midpoint (eval) or uniformly inside it (stratified).
Samples whose occupancy cell is empty, and all samples of rays that miss the box, are dropped: the field is
evaluated only on the kept ones ("packed" [K] tensors with the index of their ray), the others count as
density 0. Compositing uses the dense [R, S] layout:
``alpha_i = 1 - exp(-sigma_i delta)``, ``T_i = prod_{j<i} (1 - alpha_j) = exp(-sum_{j<i} sigma_j delta)``,
``w_i = T_i alpha_i``; colours, normals and depths are weight-summed per ray with ``index_add``.

On CUDA with nerfacc importable the sampling and weights can come from nerfacc 0.5 instead
(:func:`sample_rays_nerfacc`, :func:`weights_nerfacc`); the packed outputs mean the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class RaySamples:
    """Kept samples of a batch of ``n_rays`` rays, packed: sample ``k`` lies on ray ``ray_idx[k]``."""

    positions: torch.Tensor  # [K, 3] (may be a transposed view of a [3, K] tensor)
    ray_idx: torch.Tensor  # [K] int64
    t: torch.Tensor  # [K] distance along the (unit) ray direction
    delta: torch.Tensor  # [K] bin width
    n_rays: int
    # dense layout (torch path): flat index of each kept sample in [n_rays * num_samples]; None for nerfacc
    flat_idx: torch.Tensor | None = None
    num_samples: int = 0
    n_candidates: int = 0  # samples inside the box before occupancy culling

    @property
    def n_kept(self) -> int:
        return int(self.ray_idx.shape[0])


def ray_aabb(origins: torch.Tensor, dirs: torch.Tensor,
             bound: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab test against ``[-bound, bound]^3``: ``t_near`` (clamped to >= 0), ``t_far`` and ``hit`` per ray."""
    safe = torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    inv = 1.0 / safe
    t0 = (-bound - origins) * inv
    t1 = (bound - origins) * inv
    t_near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(0.0)
    t_far = torch.maximum(t0, t1).amin(dim=-1)
    hit = t_far > t_near + 1e-6
    return t_near, t_far, hit


def sample_rays(origins: torch.Tensor, dirs: torch.Tensor, bound: float, num_samples: int, stratified: bool,
                occupied: Callable[[torch.Tensor], torch.Tensor] | None = None) -> RaySamples:
    """Equal-bin samples between each ray's box entry and exit, dropping those where ``occupied(x)`` is False.

    ``origins``/``dirs`` are [R, 3] (``dirs`` unit length). Jitter (stratified) uses torch's global RNG.
    ``occupied`` receives the candidate points as a [N, 3] view of a coordinate-major [3, N] tensor."""
    n_rays, device = origins.shape[0], origins.device
    t_near, t_far, hit = ray_aabb(origins, dirs, bound)
    ray_ids = hit.nonzero().squeeze(1)  # rays that reach the box
    step = ((t_far[ray_ids] - t_near[ray_ids]) / num_samples).unsqueeze(1)  # [Rh, 1]
    offsets = torch.arange(num_samples, device=device, dtype=origins.dtype).unsqueeze(0)
    if stratified:
        offsets = offsets + torch.rand(ray_ids.shape[0], num_samples, device=device, dtype=origins.dtype)
    else:
        offsets = offsets + 0.5
    t = t_near[ray_ids].unsqueeze(1) + offsets * step  # [Rh, S]
    # coordinate-major [3, Rh, S] keeps the broadcasts contiguous along the samples
    o_t = origins[ray_ids].t().contiguous().unsqueeze(2)
    d_t = dirs[ray_ids].t().contiguous().unsqueeze(2)
    pos = torch.addcmul(o_t, d_t, t.unsqueeze(0)).view(3, -1)  # [3, Rh*S]
    n_candidates = t.numel()
    if occupied is not None:
        local = occupied(pos.t()).nonzero().squeeze(1)  # [K] into [Rh * S]
        pos = pos.index_select(1, local)
        t_k = t.view(-1).index_select(0, local)
    else:
        local = torch.arange(t.numel(), device=device)
        t_k = t.view(-1)
    row = torch.div(local, num_samples, rounding_mode="floor")
    col = local - row * num_samples
    ray_idx = ray_ids[row]
    return RaySamples(positions=pos.t(), ray_idx=ray_idx, t=t_k, delta=step.view(-1)[row], n_rays=n_rays,
                      flat_idx=ray_idx * num_samples + col, num_samples=num_samples, n_candidates=n_candidates)


def weights_dense(samples: RaySamples, sigma: torch.Tensor) -> torch.Tensor:
    """Compositing weights [K] of the kept samples from their densities [K] (dense [R, S] scan)."""
    r, s = samples.n_rays, samples.num_samples
    tau_k = sigma * samples.delta
    tau = torch.zeros(r * s, dtype=sigma.dtype, device=sigma.device).index_put((samples.flat_idx,), tau_k).view(r, s)
    # exclusive prefix sum: optical depth in front of each sample
    depth_before = torch.cat([torch.zeros_like(tau[:, :1]), tau[:, :-1]], dim=1).cumsum(dim=1)
    weights = torch.exp(-depth_before) * (-torch.expm1(-tau))
    return weights.view(-1)[samples.flat_idx]


def accumulate(weights: torch.Tensor, values: torch.Tensor | None, ray_idx: torch.Tensor, n_rays: int) -> torch.Tensor:
    """Per-ray sums ``sum_k w_k v_k`` ([n_rays, C]); ``values=None`` sums the weights ([n_rays, 1])."""
    src = weights.unsqueeze(1) if values is None else weights.unsqueeze(1) * values
    out = torch.zeros(n_rays, src.shape[1], dtype=src.dtype, device=src.device)
    return out.index_add(0, ray_idx, src)


def composite(weights: torch.Tensor, samples: RaySamples, values: dict[str, torch.Tensor] | None = None,
              use_nerfacc: bool = False) -> dict[str, torch.Tensor]:
    """Opacity [R,1], expected depth [R,1] (``sum w t / opacity``; 0 where nothing is hit) and the weighted
    sum of every per-sample value in ``values`` ([K, C] -> [R, C])."""
    acc = accumulate
    if use_nerfacc:
        import nerfacc  # lazy: optional CUDA extension

        def acc(w, v, idx, n):
            return nerfacc.accumulate_along_rays(w, v, ray_indices=idx, n_rays=n)
    n = samples.n_rays
    opacity = acc(weights, None, samples.ray_idx, n)
    depth_sum = acc(weights, samples.t.unsqueeze(1), samples.ray_idx, n)
    out = {"opacity": opacity, "depth": depth_sum / opacity.clamp_min(1e-6) * (opacity > 1e-6)}
    for key, value in (values or {}).items():
        out[key] = acc(weights, value, samples.ray_idx, n)
    return out


def render_rays(origins: torch.Tensor, dirs: torch.Tensor, field_fn: Callable[[torch.Tensor], dict], bound: float,
                num_samples: int, stratified: bool = False,
                occupied: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Render [R] rays through ``field_fn(x [K,3]) -> {"sigma": [K], name: [K, C], ...}``.

    Returns "opacity", "depth", every other field output composited, plus "weights" [K] and "samples"."""
    samples = sample_rays(origins, dirs, bound, num_samples, stratified, occupied)
    fields = field_fn(samples.positions)
    sigma = fields.pop("sigma")
    weights = weights_dense(samples, sigma)
    out = composite(weights, samples, fields)
    out["weights"], out["samples"] = weights, samples
    return out


# ---------------------------------------------------------------------------------------------------------
# nerfacc 0.5 path (CUDA only; lazily imported, not exercised by the CPU test-suite)


def make_nerfacc_estimator(bound: float, resolution: int, device: torch.device):
    import nerfacc  # lazy

    aabb = torch.tensor([-bound, -bound, -bound, bound, bound, bound], dtype=torch.float32, device=device)
    return nerfacc.OccGridEstimator(roi_aabb=aabb, resolution=resolution, levels=1).to(device)


def sample_rays_nerfacc(estimator, occupancy_mask: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor,
                        bound: float, num_samples: int, stratified: bool) -> RaySamples:
    """nerfacc's grid marcher with our occupancy mask and a step of ``2*sqrt(3)*bound / num_samples`` (the
    torch path's bin width on the cube's diagonal), so no ray gets more than ``num_samples`` samples."""
    estimator.binaries.copy_(occupancy_mask.view_as(estimator.binaries))
    step = 2.0 * math.sqrt(3.0) * bound / num_samples
    ray_idx, t_starts, t_ends = estimator.sampling(origins, dirs, render_step_size=step, stratified=stratified,
                                                   near_plane=0.0)
    t = 0.5 * (t_starts + t_ends)
    pos = origins[ray_idx] + t.unsqueeze(1) * dirs[ray_idx]
    return RaySamples(positions=pos, ray_idx=ray_idx.long(), t=t, delta=t_ends - t_starts, n_rays=origins.shape[0],
                      num_samples=num_samples, n_candidates=int(ray_idx.shape[0]))


def weights_nerfacc(samples: RaySamples, sigma: torch.Tensor) -> torch.Tensor:
    import nerfacc  # lazy

    t_starts = samples.t - 0.5 * samples.delta
    weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_starts + samples.delta, sigma,
                                                       ray_indices=samples.ray_idx, n_rays=samples.n_rays)
    return weights
