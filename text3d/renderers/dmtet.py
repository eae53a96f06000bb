"""DMTet: a deformable tetrahedral grid with an SDF per vertex, and differentiable marching tetrahedra.

The grid splits each cube of an N^3 lattice over [-bound, bound]^3 into six tetrahedra around its main
diagonal (all sharing that diagonal, so neighbouring cubes match face to face). Marching tetrahedra
puts a surface vertex on every grid edge whose endpoints' SDF signs differ, at the zero crossing of
the linear interpolation ``p = (p_a s_b - p_b s_a) / (s_b - s_a)``, so surface positions are
differentiable with respect to both the SDF values and the (deformed) grid vertices. A tetrahedron
with one or three vertices inside gives one triangle, with two inside a quad (two triangles). Surface
vertices are shared between tetrahedra through their grid edge, so the mesh is connected, and every
triangle is turned to face from the inside (SDF < 0) towards the outside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# the six tetrahedra of a cube, as corner indices (corner = x + 2y + 4z), all around the diagonal 0-7
CUBE_TETS = torch.tensor([[0, 1, 3, 7], [0, 3, 2, 7], [0, 2, 6, 7], [0, 6, 4, 7], [0, 4, 5, 7], [0, 5, 1, 7]])
TET_EDGES = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])


def _edge(a: int, b: int) -> int:
    return next(i for i, (p, q) in enumerate(TET_EDGES.tolist()) if {p, q} == {a, b})


def _triangle_table() -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the 16 inside-patterns: up to two triangles as tet-edge indices (-1 padded), and a count."""
    table = torch.full((16, 2, 3), -1, dtype=torch.long)
    count = torch.zeros(16, dtype=torch.long)
    for code in range(16):
        inside = [v for v in range(4) if code >> v & 1]
        outside = [v for v in range(4) if not code >> v & 1]
        if len(inside) in (1, 3):
            lone = inside[0] if len(inside) == 1 else outside[0]
            others = [v for v in range(4) if v != lone]
            table[code, 0] = torch.tensor([_edge(lone, o) for o in others])
            count[code] = 1
        elif len(inside) == 2:
            (a, b), (c, d) = inside, outside
            quad = [_edge(a, c), _edge(a, d), _edge(b, d), _edge(b, c)]  # a cycle around the quad
            table[code, 0] = torch.tensor(quad[:3])
            table[code, 1] = torch.tensor([quad[0], quad[2], quad[3]])
            count[code] = 2
    return table, count


TRIANGLE_TABLE, TRIANGLE_COUNT = _triangle_table()


def tet_grid(resolution: int, bound: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(vertices [(N+1)^3, 3], tets [6 N^3, 4]) of the lattice with N = ``resolution`` cubes per side."""
    n = resolution
    axis = torch.linspace(-bound, bound, n + 1)
    zz, yy, xx = torch.meshgrid(axis, axis, axis, indexing="ij")
    vertices = torch.stack([xx, yy, zz], dim=-1).reshape(-1, 3)
    idx = torch.arange(n)
    z, y, x = torch.meshgrid(idx, idx, idx, indexing="ij")
    base = (z * (n + 1) + y) * (n + 1) + x  # [n, n, n] corner 0 of each cube
    offsets = torch.tensor([0, 1, n + 1, n + 2, (n + 1) ** 2, (n + 1) ** 2 + 1, (n + 1) ** 2 + n + 1,
                            (n + 1) ** 2 + n + 2])
    corners = base.reshape(-1, 1) + offsets  # [cubes, 8] with corner = x + 2y + 4z
    tets = corners[:, CUBE_TETS].reshape(-1, 4)
    return vertices, tets


@dataclass
class SurfaceMesh:
    vertices: torch.Tensor  # [V, 3]
    faces: torch.Tensor  # [F, 3] int64


def marching_tetrahedra(vertices: torch.Tensor, tets: torch.Tensor, sdf: torch.Tensor) -> SurfaceMesh:
    """The zero level set of ``sdf`` [V] (negative inside) over the tetrahedral grid, differentiable."""
    inside = sdf.detach() < 0
    occ = inside[tets]  # [T, 4]
    code = (occ.long() * (2 ** torch.arange(4, device=tets.device))).sum(1)
    active = (code > 0) & (code < 15)
    tets, code = tets[active], code[active]
    if tets.numel() == 0:
        return SurfaceMesh(vertices.new_zeros(0, 3), torch.zeros(0, 3, dtype=torch.long, device=tets.device))
    edges = tets[:, TET_EDGES.to(tets.device)]  # [T, 6, 2] grid-vertex pairs
    a, b = edges.min(dim=-1).values, edges.max(dim=-1).values
    n = vertices.shape[0]
    key = a * n + b  # [T, 6]
    crossing = inside[a] != inside[b]
    unique_keys, inverse = torch.unique(key[crossing], return_inverse=True)
    ua, ub = unique_keys // n, unique_keys % n
    sa, sb = sdf[ua].unsqueeze(1), sdf[ub].unsqueeze(1)
    denom = sb - sa
    denom = torch.where(denom.abs() < 1e-12, torch.full_like(denom, 1e-12), denom)
    surface = (vertices[ua] * sb - vertices[ub] * sa) / denom
    edge_vertex = torch.full_like(key, -1)
    edge_vertex[crossing] = inverse
    table = TRIANGLE_TABLE.to(tets.device)[code]  # [T, 2, 3] tet-edge indices
    counts = TRIANGLE_COUNT.to(tets.device)[code]
    tri_edges = torch.cat([table[:, 0], table[counts == 2, 1]])  # [F, 3]
    owner = torch.cat([torch.arange(len(tets), device=tets.device),
                       torch.nonzero(counts == 2).squeeze(1)])
    faces = torch.gather(edge_vertex[owner], 1, tri_edges)
    # orient each triangle from the inside towards the outside of its tetrahedron
    tv = vertices[tets[owner]].detach()  # [F, 4, 3]
    occ_f = inside[tets[owner]].float().unsqueeze(-1)
    centre_in = (tv * occ_f).sum(1) / occ_f.sum(1)
    centre_out = (tv * (1 - occ_f)).sum(1) / (1 - occ_f).sum(1)
    p = surface.detach()[faces]
    normal = torch.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=-1)
    flip = (normal * (centre_out - centre_in)).sum(-1) < 0
    faces = torch.where(flip.unsqueeze(1), faces[:, [0, 2, 1]], faces)
    return SurfaceMesh(surface, faces)


class DMTet(nn.Module):
    """Trainable SDF and bounded vertex offsets on a tetrahedral grid (Shen et al. 2021)."""

    def __init__(self, resolution: int = 32, bound: float = 1.0):
        super().__init__()
        vertices, tets = tet_grid(resolution, bound)
        self.register_buffer("grid", vertices)
        self.register_buffer("tets", tets)
        self.cell = 2.0 * bound / resolution
        self.sdf = nn.Parameter(torch.zeros(len(vertices)))
        self.deform = nn.Parameter(torch.zeros(len(vertices), 3))

    @torch.no_grad()
    def init_sdf(self, sdf_fn, chunk: int = 65536) -> None:
        """Set the SDF from ``sdf_fn(points [N, 3]) -> [N]`` (e.g. threshold minus a NeRF's density)."""
        values = [sdf_fn(self.grid[i:i + chunk]).reshape(-1) for i in range(0, len(self.grid), chunk)]
        self.sdf.copy_(torch.cat(values).to(self.sdf))

    def deformed_vertices(self) -> torch.Tensor:
        return self.grid + 0.5 * self.cell * torch.tanh(self.deform)  # at most half a cell: tets never invert

    def forward(self) -> SurfaceMesh:
        return marching_tetrahedra(self.deformed_vertices(), self.tets, self.sdf)


def laplacian_loss(mesh: SurfaceMesh) -> torch.Tensor:
    """Mean squared distance of each vertex from the mean of its neighbours (uniform Laplacian)."""
    v, f = mesh.vertices, mesh.faces
    if f.numel() == 0:
        return v.sum() * 0.0
    src = torch.cat([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0]])
    dst = torch.cat([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2]])
    total = torch.zeros_like(v).index_add(0, src, v[dst])
    degree = torch.zeros(len(v), device=v.device).index_add(0, src, torch.ones_like(src, dtype=v.dtype))
    mean = total / degree.clamp_min(1).unsqueeze(1)
    return (v - mean).pow(2).sum(-1).mean()


def normal_consistency_loss(mesh: SurfaceMesh) -> torch.Tensor:
    """Mean of 1 - cos between the normals of faces that share an edge."""
    from text3d.renderers.mesh.antialias import edge_neighbours

    v, f = mesh.vertices, mesh.faces
    if f.numel() == 0:
        return v.sum() * 0.0
    n = torch.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=-1)
    n = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    nb = edge_neighbours(f)
    valid = nb >= 0
    cos = (n.unsqueeze(1) * n[nb.clamp_min(0)]).sum(-1)
    return (1.0 - cos)[valid].mean()
