"""Hash-grid encoding against a naive per-point reference (explicit corners, explicit hashing)."""

import math

import pytest
import torch

from text3d.renderers.hashgrid import HashGridEncoding

PRIMES = (1, 2654435761, 805459861)


def reference_resolutions(n_levels, base, finest):
    growth = math.exp((math.log(finest) - math.log(base)) / (n_levels - 1))
    return [int(math.floor(base * growth**level + 1e-6)) for level in range(n_levels)]


def reference_row(enc, level, res, corner):
    """Table row of a vertex: dense index when the level's grid fits the table, else the XOR prime hash."""
    i, j, k = corner
    table_size = 2**enc.log2_hashmap_size
    if res**3 <= table_size:
        local = i + j * res + k * res * res
    else:
        local = ((i * PRIMES[0]) ^ (j * PRIMES[1]) ^ (k * PRIMES[2])) % table_size
    return enc.level_offsets[level] + local


def reference_encode(enc, table, x, bound):
    """Per point, per level, per corner loop. Returns features [N, L*F] (float64) and, per point, the list of
    (row, level, weight) contributions (for the gradient)."""
    n_feat = table.shape[1]
    out = torch.zeros(x.shape[0], enc.n_levels * n_feat, dtype=torch.float64)
    contributions = []
    for p in range(x.shape[0]):
        contrib = []
        x01 = [min(max((float(x[p, a]) + bound) / (2 * bound), 0.0), 1.0) for a in range(3)]
        for level, res in enumerate(enc.resolutions):
            pos = [c * (res - 1) for c in x01]
            base = [min(math.floor(v), res - 2) for v in pos]
            frac = [v - b for v, b in zip(pos, base)]
            for corner in range(8):
                offs = ((corner >> 2) & 1, (corner >> 1) & 1, corner & 1)
                w = 1.0
                for a in range(3):
                    w *= frac[a] if offs[a] else 1.0 - frac[a]
                row = reference_row(enc, level, res, tuple(b + o for b, o in zip(base, offs)))
                out[p, level * n_feat:(level + 1) * n_feat] += w * table[row].double()
                contrib.append((row, level, w))
        contributions.append(contrib)
    return out, contributions


def make_encoding(n_features=2, bound=1.0):
    torch.manual_seed(0)
    # levels 5, 9, 17, 33 vertices: two dense levels (125 and 729 rows <= 1024) and two hashed ones
    enc = HashGridEncoding(n_levels=4, n_features_per_level=n_features, log2_hashmap_size=10, base_resolution=5,
                           max_resolution=33, bound=bound)
    with torch.no_grad():
        enc.embeddings.normal_()
    return enc


def test_level_layout():
    enc = HashGridEncoding(n_levels=4, n_features_per_level=2, log2_hashmap_size=10, base_resolution=5,
                           max_resolution=33)
    assert enc.resolutions == reference_resolutions(4, 5, 33) == [5, 9, 17, 33]
    assert enc.dense_levels == 2
    assert enc.output_dim == 8
    fresh = enc.embeddings.detach()
    assert fresh.abs().max() <= 1e-4 and fresh.abs().max() > 0  # uniform(-1e-4, 1e-4) init
    default = HashGridEncoding()
    assert default.resolutions[0] == 16 and default.resolutions[-1] == 256


def edge_points(bound):
    """Box corners, points on edges and faces, and points just inside."""
    vals = [-bound, bound]
    corners = torch.tensor([[a, b, c] for a in vals for b in vals for c in vals])
    edges = torch.tensor([[bound, -bound, 0.3], [-bound, 0.77, bound], [0.1, bound, -0.6], [0.0, 0.0, 0.0],
                          [bound * 0.999999, -bound * 0.999999, 0.5]])
    return torch.cat([corners, edges]).float()


@pytest.mark.parametrize("n_features", [2, 1, 4])
def test_matches_naive_reference(n_features):
    bound = 1.5
    enc = make_encoding(n_features, bound)
    x = torch.cat([torch.rand(120, 3) * 2 * bound - bound, edge_points(bound)])
    ref, _ = reference_encode(enc, enc.embeddings.detach(), x, bound)
    out = enc(x)
    assert out.shape == (x.shape[0], 4 * n_features)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # the Jacobian path returns the same encoding
    enc2, _ = enc.forward_with_jacobian(x)
    torch.testing.assert_close(enc2, out, rtol=1e-6, atol=1e-6)


def test_vertex_values_equal_table_entries_exactly():
    enc = make_encoding(2)
    table = enc.embeddings.detach()
    for level, res in enumerate(enc.resolutions):
        ii = torch.arange(res)
        grid = torch.stack(torch.meshgrid(ii, ii, ii, indexing="ij"), -1).view(-1, 3)
        pick = torch.randperm(grid.shape[0])[:200]
        grid = torch.cat([grid[pick], torch.tensor([[0, 0, 0], [res - 1, res - 1, res - 1], [res - 1, 0, res - 1]])])
        x = (grid.float() * (2.0 / (res - 1)) - 1.0)  # dyadic (res - 1 is a power of two): exact vertex positions
        out = enc(x)[:, level * 2:(level + 1) * 2]
        rows = torch.tensor([reference_row(enc, level, res, tuple(int(v) for v in g)) for g in grid])
        assert torch.equal(out, table[rows]), f"level {level}"


def test_table_gradient_matches_reference():
    enc = make_encoding(2)
    x = torch.cat([torch.rand(60, 3) * 2 - 1, edge_points(1.0)])
    upstream = torch.randn(x.shape[0], enc.output_dim)
    (enc(x) * upstream).sum().backward()
    _, contributions = reference_encode(enc, enc.embeddings.detach(), x, 1.0)
    ref = torch.zeros(enc.embeddings.shape, dtype=torch.float64)
    for p, contrib in enumerate(contributions):
        for row, level, w in contrib:
            ref[row] += w * upstream[p, level * 2:(level + 1) * 2].double()
    torch.testing.assert_close(enc.embeddings.grad.double(), ref, rtol=1e-5, atol=1e-5)


def test_spatial_jacobian_and_its_table_gradient():
    enc = make_encoding(2)
    x = torch.rand(50, 3) * 1.8 - 0.9
    # generic autograd path (x requires grad) gives the reference Jacobian
    xg = x.clone().requires_grad_(True)
    feats = enc(xg)
    jac_ref = torch.stack([torch.autograd.grad(feats[:, d].sum(), xg, retain_graph=True)[0]
                           for d in range(feats.shape[1])], dim=-1)  # [N, 3, D]
    _, jac = enc.forward_with_jacobian(x)  # fast closed-form path
    torch.testing.assert_close(jac, jac_ref.permute(1, 0, 2), rtol=1e-4, atol=1e-4)
    # and the table gradient through the Jacobian agrees between the two paths
    w = torch.randn_like(jac)
    g_fast = torch.autograd.grad((enc.forward_with_jacobian(x)[1] * w).sum(), enc.embeddings)[0]
    g_ref = torch.autograd.grad((enc.forward_with_jacobian(xg)[1] * w).sum(), enc.embeddings)[0]
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-4, atol=1e-4)
