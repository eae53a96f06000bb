"""DMTet: the tetrahedral grid, marching tetrahedra on a sphere SDF, and the mesh regularisers."""

import torch

from text3d.renderers.dmtet import (DMTet, laplacian_loss, marching_tetrahedra, normal_consistency_loss, tet_grid)
from text3d.renderers.mesh.antialias import edge_neighbours


def test_grid_tets_fill_the_cube_with_positive_volume():
    vertices, tets = tet_grid(3, bound=1.0)
    p = vertices[tets]
    vol = torch.det(torch.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], p[:, 3] - p[:, 0]], dim=1)).abs() / 6
    assert tets.shape == (6 * 27, 4) and torch.allclose(vol.sum(), torch.tensor(8.0), atol=1e-5)
    assert (vol > 1e-6).all()


def test_marching_tetrahedra_recovers_a_sphere_closed_and_outward():
    vertices, tets = tet_grid(24, bound=1.0)
    r = 0.6
    sdf = vertices.norm(dim=-1) - r
    mesh = marching_tetrahedra(vertices, tets, sdf)
    radii = mesh.vertices.norm(dim=-1)
    assert (radii - r).abs().max() < 0.02
    # closed (every edge shared by two faces) and oriented outward (positive enclosed volume ~ 4/3 pi r^3)
    assert (edge_neighbours(mesh.faces) >= 0).all()
    v = mesh.vertices[mesh.faces]
    volume = float((v[:, 0] * torch.cross(v[:, 1], v[:, 2], dim=-1)).sum() / 6)
    assert abs(volume - 4 / 3 * torch.pi * r ** 3) / (4 / 3 * torch.pi * r ** 3) < 0.03


def test_surface_is_differentiable_in_sdf_and_deformation():
    net = DMTet(resolution=8, bound=1.0)
    net.init_sdf(lambda p: p.norm(dim=-1) - 0.5)
    mesh = net()
    (mesh.vertices.norm(dim=-1).mean() + laplacian_loss(mesh) + normal_consistency_loss(mesh)).backward()
    assert net.sdf.grad.abs().sum() > 0 and net.deform.grad.abs().sum() > 0


def test_regularisers_are_zero_on_flat_and_positive_on_bumpy_surfaces():
    vertices, tets = tet_grid(6, bound=1.0)
    flat = marching_tetrahedra(vertices, tets, vertices[:, 2] - 0.1)  # the plane z = 0.1
    assert float(normal_consistency_loss(flat)) < 1e-6
    bumpy = marching_tetrahedra(vertices, tets, vertices[:, 2] - 0.1 + 0.2 * torch.sin(6 * vertices[:, 0]))
    assert float(normal_consistency_loss(bumpy)) > 1e-3
