"""NeRFRenderer: shapes, gradients, camera convention, normals, occupancy, resume and density grids."""

import dataclasses

import pytest
import torch
from torch import nn

from text3d.cameras import Cameras, spherical_cameras
from text3d.errors import ConfigError
from text3d.renderers import NeRFConfig, NeRFRenderer
from text3d.renderers.volume import ray_aabb


def small_config(**kw):
    cfg = dict(n_levels=4, log2_hashmap_size=12, base_resolution=8, max_resolution=64, hidden_dim=16,
               num_samples=32, occupancy_resolution=16, backend="torch")
    cfg.update(kw)
    return NeRFConfig(**cfg)


def make_renderer(seed=0, **kw):
    torch.manual_seed(seed)
    return NeRFRenderer(small_config(**kw))


class SignField(nn.Module):
    """Opaque ball of radius 0.5; colour red/blue by the sign of z, green channel by the sign of y,
    and the x sign in a fourth "channel" folded into red's intensity (0.5 / 1.0)."""

    def forward(self, x):
        inside = (x.norm(dim=-1) < 0.5).float()
        red = torch.where(x[:, 2] > 0, torch.where(x[:, 0] > 0, 1.0, 0.5), 0.0)
        blue = (x[:, 2] <= 0).float()
        green = (x[:, 1] > 0).float()
        return 200.0 * inside, torch.stack([red, green, blue], -1)

    def query_density(self, x):
        return self(x)[0]

    def query_albedo(self, x):
        return self(x)[1]


def test_default_config_is_plain_and_validated():
    cfg = NeRFConfig()
    for f in dataclasses.fields(cfg):
        assert isinstance(getattr(cfg, f.name), (int, float, bool, str, tuple)), f.name
    with pytest.raises(ConfigError):
        NeRFRenderer(small_config(normals="magic"))
    with pytest.raises(ConfigError):
        NeRFRenderer(small_config(density_activation="relu"))
    with pytest.raises(ConfigError):
        make_renderer()(spherical_cameras(0.0, 0.0, 2.8, 42.0), 8, 8, shading="phong")


@pytest.mark.parametrize("shading", ["albedo", "lambertian", "textureless"])
def test_output_shapes_and_ranges(shading):
    r = make_renderer(density_activation="exp" if shading == "textureless" else "softplus").eval()
    cams = spherical_cameras([10.0, 30.0], [0.0, 120.0], 2.8, 42.0)
    with torch.no_grad():
        out = r(cams, 16, 12, shading=shading)
    assert out["rgb"].shape == (2, 3, 16, 12)
    assert out["opacity"].shape == (2, 1, 16, 12) and out["depth"].shape == (2, 1, 16, 12)
    assert 0.0 <= out["rgb"].min() and out["rgb"].max() <= 1.0
    assert 0.0 <= out["opacity"].min() and out["opacity"].max() <= 1.0 + 1e-6
    assert out["opacity"].max() > 0.9  # the initial blob is visible
    assert (out["depth"] >= 0).all() and out["depth"].max() > 1.5
    assert out["opacity_sparsity"].dim() == 0
    if shading == "albedo":
        assert "normal" not in out and "orientation_loss" not in out
    else:
        assert out["normal"].shape == (2, 3, 16, 12)
        assert out["orientation_loss"].dim() == 0 and out["orientation_loss"] >= 0


@pytest.mark.parametrize("shading", ["albedo", "lambertian"])
def test_gradients_reach_hash_table_mlp_and_background(shading):
    r = make_renderer().train()
    r.update_occupancy(0)
    out = r(spherical_cameras(15.0, 30.0, 2.8, 42.0), 24, 24, shading=shading)
    loss = out["rgb"].mean() + out.get("orientation_loss", 0.0)
    loss.backward()
    assert r.field.encoding.embeddings.grad is not None and r.field.encoding.embeddings.grad.abs().sum() > 0
    assert r.field.mlp.out.weight.grad.abs().sum() > 0
    bg_grads = [p.grad for p in r.background.parameters()]
    assert bg_grads and all(g is not None and g.abs().sum() > 0 for g in bg_grads)


def test_camera_convention_front_is_plus_z_and_row_zero_is_top():
    r = make_renderer(background="solid", background_color=(0.0, 0.0, 0.0)).eval()
    r.field = SignField()
    with torch.no_grad():
        front = r(spherical_cameras(0.0, 0.0, 2.8, 42.0), 32, 32)["rgb"][0]
        back = r(spherical_cameras(0.0, 180.0, 2.8, 42.0), 32, 32)["rgb"][0]
    centre = (slice(12, 20), slice(12, 20))
    assert front[0][centre].mean() > 0.5 and front[2][centre].mean() < 0.1  # az=0 sees +Z (red)
    assert back[2][centre].mean() > 0.9 and back[0][centre].mean() < 0.1  # az=180 sees -Z (blue)
    # row 0 is the top: green (y > 0) in the upper half only
    assert front[1, 10:14, 12:20].mean() > 0.9 and front[1, 18:22, 12:20].mean() < 0.1
    # from the front, +X is on the right (full red) and -X on the left (half red)
    assert front[0, 12:20, 18:22].mean() > 0.9 and abs(front[0, 12:20, 10:14].mean() - 0.5) < 0.05


def test_normals_of_blob_point_outward():
    r = make_renderer().eval()
    torch.manual_seed(3)
    x = torch.randn(2000, 3)
    x = x / x.norm(dim=-1, keepdim=True) * (0.1 + 0.6 * torch.rand(2000, 1))
    for method in ("analytic", "finite_difference", "autograd"):
        _, _, n = r.field.forward_with_normals(x, method)
        assert (n * x / x.norm(dim=-1, keepdim=True)).sum(-1).mean() > 0.9, method
    # rendered normals of a sharp blob (a near-opaque ball) face the camera
    sharp = make_renderer(blob_density=100.0).eval()
    cams = spherical_cameras(20.0, 45.0, 2.8, 42.0)
    with torch.no_grad():
        out = sharp(cams, 24, 24, want_normals=True)
    _, dirs = cams.rays(24, 24)
    n = out["normal"][0].permute(1, 2, 0)
    hit = out["opacity"][0, 0] > 0.5
    facing = -(torch.nn.functional.normalize(n, dim=-1) * dirs[0]).sum(-1)
    assert hit.sum() > 50 and facing[hit].min() > 0.0
    assert facing[hit].mean() > 0.55  # a ball's cos(normal, view) averages 2/3 over its disc
    assert facing[11:13, 11:13].min() > 0.95  # head-on in the middle


def test_analytic_normals_match_autograd_including_parameter_gradients():
    r = make_renderer().train()
    with torch.no_grad():
        r.field.encoding.embeddings.normal_(0.0, 0.5)
    x = torch.rand(300, 3) * 1.6 - 0.8
    w = torch.randn(300, 3)
    grads = []
    for method in ("analytic", "autograd"):
        s, a, n = r.field.forward_with_normals(x, method, create_graph=True)
        params = [r.field.encoding.embeddings, r.field.mlp.hidden[0].weight, r.field.mlp.out.weight]
        grads.append(torch.autograd.grad((n * w).sum() + (s * a[:, 0]).sum(), params))
        grads[-1] = (n,) + grads[-1]
    for fast, ref in zip(*grads):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_occupancy_grid_marks_blob_and_empty_corners():
    r = make_renderer()
    assert r.occupancy.mask.all()  # everything is occupied before the first update
    r.update_occupancy(0)
    mask, res = r.occupancy.mask, r.cfg.occupancy_resolution
    c = res // 2
    assert mask[c - 1:c + 1, c - 1:c + 1, c - 1:c + 1].all()
    for i in (0, res - 1):
        for j in (0, res - 1):
            for k in (0, res - 1):
                assert not mask[i, j, k]
    assert 0.02 < mask.float().mean() < 0.3
    before = r.occupancy.density.clone()
    r.update_occupancy(5)  # not a multiple of occupancy_update_every: no change
    assert torch.equal(before, r.occupancy.density)
    state = r.state_dict()
    assert {"occupancy.density", "occupancy.mask", "occupancy.initialized"} <= set(state)
    # culling is active in renders
    with torch.no_grad():
        r.eval()(spherical_cameras(0.0, 0.0, 2.8, 42.0), 16, 16)
    assert r.last_stats["culled_fraction"] > 0.5


def test_state_dict_round_trip_reproduces_image_exactly():
    r1 = make_renderer(seed=0).train()
    opt = torch.optim.Adam(r1.parameters(), lr=1e-2)
    for step in range(3):
        r1.update_occupancy(step * 16)
        out = r1(spherical_cameras(15.0, 40.0 * step, 2.8, 42.0), 16, 16, shading="lambertian")
        (out["rgb"].mean() + out["orientation_loss"]).backward()
        opt.step()
        opt.zero_grad()
    r2 = make_renderer(seed=123)
    r2.load_state_dict(r1.state_dict())
    cams = spherical_cameras(10.0, 70.0, 2.8, 42.0)
    with torch.no_grad():
        a = r1.eval()(cams, 20, 20, shading="lambertian")
        b = r2.eval()(cams, 20, 20, shading="lambertian")
    for key in ("rgb", "opacity", "depth", "normal"):
        assert torch.equal(a[key], b[key]), key
    # stratified (training) renders depend only on the global RNG state
    r1.train(), r2.train()
    torch.manual_seed(7)
    a = r1(cams, 12, 12)["rgb"]
    torch.manual_seed(7)
    b = r2(cams, 12, 12)["rgb"]
    assert torch.equal(a, b)


def test_density_grid_shape_and_orientation():
    r = make_renderer(bound=1.5)
    r.field.query_density = lambda x: x[:, 0] + 10.0 * x[:, 1] + 100.0 * x[:, 2]
    g = r.density_grid(5, chunk=7)
    assert g.shape == (5, 5, 5)
    lin = torch.linspace(-1.5, 1.5, 5)
    torch.testing.assert_close(g[:, 0, 0] - g[0, 0, 0], lin - lin[0])
    torch.testing.assert_close(g[0, :, 0] - g[0, 0, 0], 10.0 * (lin - lin[0]))
    torch.testing.assert_close(g[0, 0, :] - g[0, 0, 0], 100.0 * (lin - lin[0]))
    assert not g.requires_grad
    # the real field: the blob peaks in the middle
    real = make_renderer().density_grid(9)
    assert real[4, 4, 4] == real.max() and real[0, 0, 0] < 1e-2


def test_background_only_where_rays_miss_and_override():
    r = make_renderer(background="solid", background_color=(0.2, 0.4, 0.6)).eval()
    cams = spherical_cameras(0.0, 30.0, 2.8, 150.0)  # a wide view: the image corners miss the box
    with torch.no_grad():
        out = r(cams, 16, 16)
        black = r(cams, 16, 16, background_color=torch.zeros(1, 3))
    o, d = cams.rays(16, 16)
    _, _, hit = ray_aabb(o.view(-1, 3), d.view(-1, 3), 1.0)
    miss = ~hit.view(16, 16)
    assert miss.sum() > 10
    assert (out["opacity"][0, 0][miss] == 0).all()
    expected = torch.tensor([0.2, 0.4, 0.6])[:, None]
    torch.testing.assert_close(out["rgb"][0][:, miss], expected.expand(3, int(miss.sum())))
    assert (black["rgb"][0][:, miss] == 0).all()
    assert torch.allclose(black["rgb"] + (1 - black["opacity"]) * expected.view(1, 3, 1, 1), out["rgb"], atol=1e-6)


def test_light_direction_changes_lambertian_shading():
    r = make_renderer(background="solid", blob_density=100.0).eval()
    cams = spherical_cameras(0.0, 0.0, 2.8, 42.0)
    with torch.no_grad():
        towards_camera = r(cams, 16, 16, shading="textureless")["rgb"]
        from_behind = r(cams, 16, 16, shading="textureless", light_dirs=torch.tensor([[0.0, 0.0, -1.0]]),
                        ambient=0.1)["rgb"]
    centre = (0, slice(None), slice(6, 10), slice(6, 10))
    assert towards_camera[centre].mean() > 0.9  # lit head-on
    assert from_behind[centre].mean() < 0.2  # only ambient


def test_chunked_rendering_matches_unchunked():
    r = make_renderer().eval()
    r.update_occupancy(0)
    cams = spherical_cameras([0.0, 20.0], [10.0, -60.0], 2.8, 42.0)
    with torch.no_grad():
        a = r(cams, 16, 16, shading="lambertian")
        r.ray_chunk = 100
        b = r(cams, 16, 16, shading="lambertian")
    for key in ("rgb", "opacity", "depth", "normal"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    torch.testing.assert_close(a["orientation_loss"], b["orientation_loss"])


def test_camera_looking_away_renders_background_and_backpropagates():
    r = make_renderer().train()
    c2w = torch.eye(4)[None].clone()
    c2w[0, 2, 3] = 3.0  # at +3 z, looking along -z of its own frame... flipped to look away from the box
    c2w[0, :3, 2] = torch.tensor([0.0, 0.0, -1.0])
    c2w[0, :3, 0] = torch.tensor([-1.0, 0.0, 0.0])
    cams = Cameras(c2w, torch.tensor([30.0]), torch.zeros(1), torch.zeros(1), torch.tensor([3.0]))
    out = r(cams, 8, 8, shading="lambertian")
    assert r.last_stats["samples_kept"] == 0 and out["opacity"].abs().max() == 0
    (out["rgb"].sum() + out["orientation_loss"]).backward()
    assert all(p.grad is not None for p in r.background.parameters())


class UniformBall(nn.Module):
    """A ball of radius 0.5 with one density and one albedo (orange)."""

    def __init__(self, sigma):
        super().__init__()
        self.sigma = sigma

    def forward(self, x):
        inside = (x.norm(dim=-1) < 0.5).float()
        return self.sigma * inside, torch.tensor([1.0, 0.5, 0.0]).expand(x.shape[0], 3)

    def query_density(self, x):
        return self(x)[0]


def test_seen_albedo_is_the_albedo_where_opaque_and_shows_the_background_where_translucent():
    r = make_renderer(num_samples=256, background="solid", background_color=(1.0, 1.0, 1.0))
    points = torch.tensor([[0.5, 0.0, 0.0], [0.0, -0.5, 0.0], [0.0, 0.3, 0.4]])  # on the ball's surface
    r.field = UniformBall(200.0)
    opaque = r.seen_albedo(points)
    assert torch.allclose(opaque, torch.tensor([1.0, 0.5, 0.0]).expand(3, 3), atol=1e-3)
    r.field = UniformBall(1.0)  # a radial ray crosses the whole diameter: transmittance exp(-1 * 1.0)
    seen = r.seen_albedo(points)
    transmittance = torch.exp(torch.tensor(-1.0))
    white = torch.ones(3)
    expected = (1 - transmittance) * torch.tensor([1.0, 0.5, 0.0]) + transmittance * white
    assert torch.allclose(seen, expected.expand(3, 3), atol=0.02)
    assert torch.allclose(r.field.query_density(points + 0.01 * points), torch.zeros(3))  # the ball ends there


def test_blob_fades_on_schedule_and_is_saved_with_the_field():
    r = make_renderer(blob_fade_start=0.2, blob_fade_end=0.6).eval()
    centre = torch.zeros(1, 3)
    with torch.no_grad():
        raw_full = float(r.field.raw(centre)[0])
        r.anneal(0.1)
        assert float(r.field.blob_scale) == 1.0 and float(r.field.raw(centre)[0]) == pytest.approx(raw_full)
        r.anneal(0.4)  # halfway through the fade
        assert float(r.field.blob_scale) == pytest.approx(0.5)
        assert float(r.field.raw(centre)[0]) == pytest.approx(raw_full - 5.0, abs=1e-4)  # 10 * (1 - 0) * 0.5
        r.anneal(0.9)
        assert float(r.field.blob_scale) == 0.0
    # the analytic normals' blob term fades with it (they match autograd at every scale)
    x = torch.randn(64, 3) * 0.4
    for progress in (0.0, 0.4):
        r.anneal(progress)
        _, _, analytic = r.field.forward_with_normals(x, "analytic")
        _, _, reference = r.field.forward_with_normals(x, "autograd")
        assert torch.allclose(analytic, reference, atol=1e-4)
    # saved and restored with the field; a field saved before the buffer existed loads with full strength
    r.anneal(0.5)
    state = r.state_dict()
    fresh = make_renderer(seed=1, blob_fade_start=0.2, blob_fade_end=0.6)
    fresh.load_state_dict(state)
    assert float(fresh.field.blob_scale) == pytest.approx(0.25)
    old = {k: v for k, v in state.items() if not k.endswith("blob_scale")}
    fresh.load_state_dict(old)
    assert float(fresh.field.blob_scale) == 1.0
    never = make_renderer()  # the default: no fade
    never.anneal(0.99)
    assert float(never.field.blob_scale) == 1.0
    with pytest.raises(ConfigError, match="blob_fade"):
        from text3d.renderers.nerf import check_nerf_config
        check_nerf_config(small_config(blob_fade_end=1.5))


@pytest.mark.parametrize("kernels", [None, "built"])
def test_nerfacc_is_used_only_when_its_cuda_kernels_load(monkeypatch, kernels):
    """nerfacc's PyPI wheel compiles its kernels on first use; when that build fails (no nvcc, a toolkit it does not
    support) its backend's ``_C`` stays None and the renderer must take the torch sampler, not crash at render."""
    import types

    from text3d.utils import backends

    fake = {"nerfacc": types.ModuleType("nerfacc"), "nerfacc.cuda._backend": types.SimpleNamespace(_C=kernels)}
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(backends, "optional_module", lambda name: fake.get(name))
    assert backends.has_nerfacc() is (kernels is not None)
    monkeypatch.setattr(backends.torch.cuda, "get_device_name", lambda *_: "fake GPU")  # doctor's device line
    line = backends.backend_report()["nerfacc"]
    assert ("did not build" in line) is (kernels is None)


class SoftBall(UniformBall):
    """Density falling linearly from ``sigma`` at the centre to 0 at r = 0.7: its rendered edge (opacity 0.5) lies
    inside the surface that Otsu's split of its density grid draws."""

    def forward(self, x):
        return self.sigma * (1.0 - x.norm(dim=-1) / 0.7).clamp_min(0.0), torch.tensor([1.0, 0.5, 0.0]).expand(x.shape[0], 3)


def test_opacity_iso_level_matches_the_nerfs_own_silhouette():
    """export.fit_opacity: the NeRF's surface is moved inwards by the offset whose silhouettes best match its own
    rendered opacity from the 12 views it names; that mesh matches them better than Otsu's and lies inside it."""
    import numpy as np

    from text3d.cameras import CameraSamplerConfig, orbit_cameras
    from text3d.export import ExportConfig
    from text3d.renderers.mesh import MeshAsset, render_mesh
    from text3d.utils.masks import silhouette_iou

    r = make_renderer(num_samples=128)
    r.field = SoftBall(12.0)
    r.eval()
    cfg = dict(grid_resolution=64, smooth_iterations=0)
    otsu = r.surface(ExportConfig(**cfg))
    with torch.no_grad():
        matched = r.export_surface(ExportConfig(fit_opacity=True, **cfg)).mesh
        cams = orbit_cameras(CameraSamplerConfig(), 8)
        own = r(cams, 64, 64, stratified=False)["opacity"]

    def iou(vertices, faces) -> float:
        asset = MeshAsset(torch.as_tensor(np.asarray(vertices), dtype=torch.float32), torch.as_tensor(np.asarray(faces)))
        return float(np.mean(silhouette_iou(render_mesh(asset, cams, 64, 64, shading="albedo")["opacity"], own)))

    assert matched.metadata["surface_offset"] > 0 and len(matched.metadata["offset_scores"]) == 6
    assert iou(matched.vertices, matched.faces) > iou(otsu.vertices.numpy(), otsu.faces.numpy()) + 0.02
    assert np.linalg.norm(matched.vertices, axis=1).mean() < otsu.vertices.norm(dim=1).mean().item()

