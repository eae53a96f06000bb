"""The pure-PyTorch mesh rasteriser: coverage, z-buffer, barycentric interpolation and gradients."""

import math

import pytest
import torch
import trimesh

from text3d.cameras import spherical_cameras
from text3d.renderers.mesh import MeshAsset, interpolate, rasterize, render_mesh


def _clip(xy_z):
    """NDC points [V, 3] as clip coordinates with w = 1."""
    pts = torch.as_tensor(xy_z, dtype=torch.float64)
    return torch.cat([pts, torch.ones(len(pts), 1, dtype=pts.dtype)], dim=1).unsqueeze(0)


def test_triangle_coverage_matches_analytic_area():
    res = 256
    tri = _clip([[-0.8, -0.7, 0.0], [0.9, -0.6, 0.0], [0.1, 0.85, 0.0]])
    rast = rasterize(tri, torch.tensor([[0, 1, 2]]), res, res)
    x, y = tri[0, :, 0], tri[0, :, 1]
    area_ndc = 0.5 * abs(float((x[1] - x[0]) * (y[2] - y[0]) - (x[2] - x[0]) * (y[1] - y[0])))
    expected_pixels = area_ndc / 4.0 * res * res
    assert abs(int((rast.face >= 0).sum()) - expected_pixels) / expected_pixels < 0.01


def test_interpolation_equals_barycentric_values_and_orientation():
    res = 64
    tri = _clip([[-0.9, -0.9, 0.0], [0.9, -0.9, 0.0], [-0.9, 0.9, 0.0]])
    attrs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    rast = rasterize(tri, torch.tensor([[0, 1, 2]]), res, res)
    out = interpolate(attrs, rast, torch.tensor([[0, 1, 2]]))
    # pixel (row r, col c) centre in NDC; compare with barycentrics computed by hand
    r, c = 40, 20
    px, py = (2 * c + 1) / res - 1, 1 - (2 * r + 1) / res
    l1 = (px + 0.9) / 1.8
    l2 = (py + 0.9) / 1.8
    assert torch.allclose(out[0, r, c], torch.tensor([1 - l1 - l2, l1, l2], dtype=torch.float64), atol=1e-9)
    assert rast.face[0, res - 4, 4] == 0 and rast.face[0, 3, res - 4] == -1  # bottom-left covered, top-right not


def test_z_buffer_keeps_the_nearest_triangle():
    near = [[-1, -1, -0.5], [1, -1, -0.5], [0, 1, -0.5]]
    far = [[-1, -1, 0.5], [1, -1, 0.5], [0, 1, 0.5]]
    for order in ([near, far], [far, near]):
        pts = _clip(order[0] + order[1])
        rast = rasterize(pts, torch.tensor([[0, 1, 2], [3, 4, 5]]), 16, 16)
        near_index = 0 if order[0] is near else 1
        covered = rast.face[rast.face >= 0]
        assert (covered == near_index).all()


def test_gradients_match_finite_differences():
    torch.manual_seed(0)
    pts = torch.tensor([[-0.7, -0.6, 0.1, 1.0], [0.8, -0.5, 0.2, 1.3], [0.0, 0.7, 0.0, 0.9]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    attrs = torch.rand(3, 2, dtype=torch.float64)
    weights = torch.rand(1, 32, 32, 2, dtype=torch.float64)

    def loss(p, a):
        rast = rasterize(p.unsqueeze(0), faces, 32, 32)
        return (interpolate(a, rast, faces) * weights).sum()

    p = pts.clone().requires_grad_(True)
    a = attrs.clone().requires_grad_(True)
    loss(p, a).backward()
    eps = 1e-6
    for tensor, grad in ((pts, p.grad), (attrs, a.grad)):
        for idx in [(0, 0), (1, 1), (2, 0), (1, 3) if tensor.shape[1] > 3 else (2, 1)]:
            plus, minus = tensor.clone(), tensor.clone()
            plus[idx] += eps
            minus[idx] -= eps
            args_p = (plus, attrs) if tensor is pts else (pts, plus)
            args_m = (minus, attrs) if tensor is pts else (pts, minus)
            numeric = (loss(*args_p) - loss(*args_m)) / (2 * eps)
            assert abs(float(numeric - grad[idx])) < 1e-4 * max(1.0, abs(float(numeric))), (idx, numeric, grad[idx])


def test_sphere_silhouette_and_orientation():
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    mesh.apply_translation([0.0, 0.0, 0.3])  # moved towards the front (+Z)
    colors = torch.where(torch.tensor(mesh.vertices[:, :1] > 0), torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0]))
    asset = MeshAsset(torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces),
                      vertex_colors=colors.float())
    cams = spherical_cameras(0.0, [0.0, 180.0], 2.8, 42.0)
    out = render_mesh(asset, cams, 96, 96, shading="albedo")
    front, back = out["opacity"][0, 0].sum(), out["opacity"][1, 0].sum()
    assert front > back  # the front camera is nearer to the shifted sphere
    expected = math.pi * (math.tan(math.asin(0.5 / 2.5)) / math.tan(math.radians(21))) ** 2 / 4 * 96 * 96
    assert abs(float(front) - expected) / expected < 0.03
    rgb = out["rgb"][0]
    # from the front, +X (red half) is on the right of the image
    assert rgb[0, 48, 60] > 0.9 and rgb[2, 48, 36] > 0.9
    # from the back, +X is on the left
    assert out["rgb"][1][0, 48, 36] > 0.9


def _aa_coverage(pts, res):
    from text3d.renderers.mesh import antialias

    faces = torch.tensor([[0, 1, 2]])
    rast = rasterize(pts, faces, res, res)
    return antialias(rast.mask.permute(0, 2, 3, 1).to(pts.dtype), rast, pts, faces)


def test_antialiased_coverage_is_closer_to_the_analytic_area_at_low_resolution():
    res = 24
    pts = _clip([[-0.83, -0.71, 0.0], [0.87, -0.57, 0.0], [0.13, 0.79, 0.0]])
    x, y = pts[0, :, 0], pts[0, :, 1]
    expected = 0.5 * abs(float((x[1] - x[0]) * (y[2] - y[0]) - (x[2] - x[0]) * (y[1] - y[0])))
    expected *= res * res / 4.0
    hard = float(rasterize(pts, torch.tensor([[0, 1, 2]]), res, res).face.ge(0).sum())
    soft = float(_aa_coverage(pts, res).sum())
    assert abs(soft - expected) / expected < 0.01
    assert abs(soft - expected) < abs(hard - expected)


def test_antialiased_coverage_gradient_wrt_vertices_matches_finite_differences():
    res = 32
    base = torch.tensor([[-0.7, -0.6, 0.0, 1.0], [0.8, -0.5, 0.0, 1.0], [0.05, 0.7, 0.0, 1.0]], dtype=torch.float64)

    def coverage(p):
        return _aa_coverage(p.unsqueeze(0), res).sum()

    def area(p):  # analytic, in pixels
        x, y = p[:, 0], p[:, 1]
        return 0.5 * abs((x[1] - x[0]) * (y[2] - y[0]) - (x[2] - x[0]) * (y[1] - y[0])) * res * res / 4

    pts = base.clone().requires_grad_(True)
    coverage(pts).backward()
    exact = base.clone().requires_grad_(True)
    area(exact).backward()
    eps = 0.06  # about one pixel in NDC: steps over the coverage jumps at pixel centres
    for v, axis in ((0, 0), (0, 1), (1, 1), (2, 0), (2, 1)):
        plus, minus = base.clone(), base.clone()
        plus[v, axis] += eps
        minus[v, axis] -= eps
        fd = float(coverage(plus) - coverage(minus)) / (2 * eps)
        grad = float(pts.grad[v, axis])
        assert abs(grad - fd) <= 0.15 * abs(fd) + 3.0, (v, axis, grad, fd)
        assert abs(grad - float(exact.grad[v, axis])) <= 0.15 * abs(float(exact.grad[v, axis])) + 3.0
    # without antialiasing the silhouette gives no gradient at all
    plain = base.clone().requires_grad_(True)
    rast = rasterize(plain.unsqueeze(0), torch.tensor([[0, 1, 2]]), res, res)
    assert not rast.mask.requires_grad


def test_texture_gradient_matches_finite_differences():
    cams = spherical_cameras(torch.tensor([20.0]), torch.tensor([30.0]), 2.5, 45.0)
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    uv = torch.rand(len(box.vertices), 2, generator=torch.Generator().manual_seed(0))
    tex = torch.rand(8, 8, 3, dtype=torch.float32, generator=torch.Generator().manual_seed(2))
    asset = MeshAsset(torch.as_tensor(box.vertices, dtype=torch.float32), torch.as_tensor(box.faces), uv,
                      tex.clone().requires_grad_(True))
    w = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(3))
    (render_mesh(asset, cams, 24, 24, shading="albedo")["rgb"] * w).sum().backward()
    for (i, j, c) in ((3, 4, 0), (5, 2, 1), (0, 7, 2)):
        plus, minus = tex.clone(), tex.clone()
        plus[i, j, c] += 0.05
        minus[i, j, c] -= 0.05
        def value(t):
            a = MeshAsset(asset.vertices, asset.faces, uv, t)
            return float((render_mesh(a, cams, 24, 24, shading="albedo")["rgb"] * w).sum())
        fd = (value(plus) - value(minus)) / 0.1
        assert abs(float(asset.texture.grad[i, j, c]) - fd) < 1e-3 + 1e-3 * abs(fd)


@pytest.mark.skipif(not __import__("text3d.utils.backends", fromlist=["x"]).has_nvdiffrast(),
                    reason="needs CUDA and nvdiffrast (not on the CPU machines)")
def test_nvdiffrast_and_torch_backends_give_the_same_image():
    cams = spherical_cameras(torch.tensor([20.0, 35.0]), torch.tensor([30.0, 150.0]), 2.5, 45.0)
    box = trimesh.creation.icosphere(subdivisions=3, radius=0.8)
    uv = torch.rand(len(box.vertices), 2, generator=torch.Generator().manual_seed(0))
    tex = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(1))
    asset = MeshAsset(torch.as_tensor(box.vertices, dtype=torch.float32).cuda(), torch.as_tensor(box.faces).cuda(),
                      uv.cuda(), tex.cuda())
    a = render_mesh(asset, cams, 96, 96, shading="lambertian", backend="torch")
    b = render_mesh(asset, cams, 96, 96, shading="lambertian", backend="nvdiffrast")
    inside = (a["opacity"] > 0.99) & (b["opacity"] > 0.99)
    assert float((a["rgb"] - b["rgb"]).abs().amax(dim=1, keepdim=True)[inside].mean()) < 0.01
    assert float((a["opacity"] - b["opacity"]).abs().mean()) < 0.01
