"""Volume rendering: analytic weights, opaque samples, weight bounds, occupancy skipping, box clipping."""

import math

import torch

from text3d.renderers import volume
from text3d.renderers.occupancy import OccupancyGrid


def one_ray(z0=-3.0):
    return torch.tensor([[0.0, 0.0, z0]]), torch.tensor([[0.0, 0.0, 1.0]])


def slab_field(a, b, sigma):
    def field(x):
        z = x[:, 2]
        return {"sigma": torch.where((z >= a) & (z <= b), torch.full_like(z, sigma), torch.zeros_like(z)),
                "rgb": torch.ones(x.shape[0], 3)}
    return field


def test_ray_aabb():
    o = torch.tensor([[0.0, 0.0, -3.0], [0.0, 0.0, 0.0], [0.0, 5.0, -3.0], [0.5, 0.5, -3.0]])
    d = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    t_near, t_far, hit = volume.ray_aabb(o, d, 1.0)
    assert hit.tolist() == [True, True, False, True]
    torch.testing.assert_close(t_near[[0, 1, 3]], torch.tensor([2.0, 0.0, 2.0]))
    torch.testing.assert_close(t_far[[0, 1, 3]], torch.tensor([4.0, 1.0, 4.0]))


def test_constant_slab_matches_analytic_opacity_and_depth():
    a, b, sigma = -0.3, 0.5, 2.0
    o, d = one_ray()
    out = volume.render_rays(o, d, slab_field(a, b, sigma), bound=1.0, num_samples=4096)
    length = b - a
    opacity = 1.0 - math.exp(-sigma * length)
    # expected termination distance given a hit: t_a + 1/sigma - L e^{-sigma L} / (1 - e^{-sigma L})
    t_a = a + 3.0
    depth = t_a + 1.0 / sigma - length * math.exp(-sigma * length) / (1.0 - math.exp(-sigma * length))
    assert abs(out["opacity"].item() - opacity) < 2e-3
    assert abs(out["depth"].item() - depth) < 2e-3
    assert abs(out["rgb"][0, 0].item() - opacity) < 2e-3  # white slab composited without background


def test_stratified_slab_converges_too():
    torch.manual_seed(0)
    o, d = one_ray()
    outs = [volume.render_rays(o, d, slab_field(-0.3, 0.5, 2.0), 1.0, 1024, stratified=True)["opacity"].item()
            for _ in range(4)]
    assert all(abs(v - (1.0 - math.exp(-1.6))) < 5e-3 for v in outs)


def test_single_opaque_sample():
    o, d = one_ray()
    # 8 bins over t in [2, 4]: sample 3 sits at t = 2.875 (z = -0.125)
    out = volume.render_rays(o, d, lambda x: {"sigma": torch.where((x[:, 2] + 0.125).abs() < 0.05,
                                                                   torch.full_like(x[:, 0], 1e5),
                                                                   torch.zeros_like(x[:, 0]))},
                             bound=1.0, num_samples=8)
    w = out["weights"]
    assert torch.allclose(w[3], torch.tensor(1.0)) and w[torch.arange(8) != 3].abs().max() == 0
    assert abs(out["depth"].item() - 2.875) < 1e-5
    assert abs(out["opacity"].item() - 1.0) < 1e-6


def test_weights_match_cumprod_and_sum_to_at_most_one():
    torch.manual_seed(0)
    o = torch.randn(256, 3)
    o = 3.0 * o / o.norm(dim=-1, keepdim=True)
    d = -o / o.norm(dim=-1, keepdim=True) + 0.2 * torch.randn(256, 3)
    d = d / d.norm(dim=-1, keepdim=True)
    field = lambda x: {"sigma": 20.0 * torch.rand(x.shape[0])}  # noqa: E731
    out = volume.render_rays(o, d, field, bound=1.0, num_samples=32)
    samples, w = out["samples"], out["weights"]
    assert (w >= 0).all()
    assert (out["opacity"] <= 1.0 + 1e-6).all()
    # the same weights from the textbook exclusive cumprod of (1 - alpha)
    sig = 20.0 * torch.rand(samples.n_kept)
    weights = volume.weights_dense(samples, sig)
    alpha = torch.zeros(samples.n_rays * 32)
    alpha[samples.flat_idx] = 1.0 - torch.exp(-sig * samples.delta)
    alpha = alpha.view(-1, 32)
    trans = torch.cumprod(torch.cat([torch.ones(alpha.shape[0], 1), 1.0 - alpha[:, :-1]], dim=1), dim=1)
    torch.testing.assert_close(weights, (trans * alpha).view(-1)[samples.flat_idx], rtol=1e-5, atol=1e-6)
    per_ray = torch.zeros(samples.n_rays).index_add_(0, samples.ray_idx, weights)
    assert (per_ray <= 1.0 + 1e-6).all() and per_ray.max() > 0.9


def test_occupancy_skipping_does_not_change_the_image():
    radius = 0.4

    def field(x):
        r = x.norm(dim=-1)
        return {"sigma": 30.0 * (radius - r).clamp_min(0.0), "rgb": torch.sigmoid(x * 3.0)}

    grid = OccupancyGrid(resolution=16, bound=1.0)
    centres = grid.cell_points(jitter=False).view(16, 16, 16, 3)
    half_diagonal = math.sqrt(3.0) * (1.0 / 16)
    grid.mask.copy_(centres.norm(dim=-1) < radius + half_diagonal)
    assert grid.mask.float().mean() < 0.1

    torch.manual_seed(1)
    o = torch.randn(500, 3)
    o = 2.5 * o / o.norm(dim=-1, keepdim=True)
    d = -o + 0.6 * torch.randn(500, 3)
    d = d / d.norm(dim=-1, keepdim=True)
    full = volume.render_rays(o, d, field, 1.0, 48)
    culled = volume.render_rays(o, d, field, 1.0, 48, occupied=grid.occupied)
    assert culled["samples"].n_kept < 0.3 * full["samples"].n_kept
    assert full["opacity"].max() > 0.5
    for key in ("opacity", "depth", "rgb"):
        torch.testing.assert_close(culled[key], full[key], rtol=0, atol=1e-6)


def test_rays_missing_the_box_get_no_samples():
    o = torch.tensor([[0.0, 3.0, -3.0], [0.0, 0.0, -3.0]])
    d = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    out = volume.render_rays(o, d, lambda x: {"sigma": torch.full((x.shape[0],), 5.0)}, 1.0, 16)
    assert (out["samples"].ray_idx == 1).all()
    assert out["opacity"][0].item() == 0.0 and out["depth"][0].item() == 0.0
    assert out["opacity"][1].item() > 0.99
