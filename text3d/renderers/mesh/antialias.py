"""Analytic edge antialiasing for the pure-PyTorch rasteriser, differentiable in the vertex positions.

The idea is nvdiffrast's: wherever two neighbouring pixels (left/right or up/down) see different
surfaces -- object against background, or an occluding edge -- the silhouette edge of the front
triangle crosses the segment between the two pixel centres. With linear screen barycentrics of both
centres with respect to that triangle, the crossing sits at the fraction ``s`` (0 at the front
centre, 1 at the other one) where the barycentric of the crossed edge reaches zero. If ``s > 1/2``
the edge reaches into the other pixel, which takes ``s - 1/2`` of the front colour; otherwise the
front pixel takes ``1/2 - s`` of the other colour. ``s`` is a differentiable function of the
projected vertices, so image losses get gradients that move silhouettes, which a plain z-buffer
cannot give. Each edge is handled by the pairs that cross it most squarely (left/right pairs for steep
edges, up/down pairs for flat ones), both from the unfiltered image, and the two are added.
"""

from __future__ import annotations

import torch

from text3d.renderers.mesh.rasterize import Rasterization, _screen

DEPTH_JUMP = 0.02  # relative depth difference that makes two covered neighbours an occlusion edge


def _barycentrics(px, py, tri, x, y):
    """Linear screen barycentrics of points (x, y) [N] w.r.t. triangles ``tri`` [N, 3] -> [N, 3]."""
    x0, y0, x1, y1, x2, y2 = px[tri[:, 0]], py[tri[:, 0]], px[tri[:, 1]], py[tri[:, 1]], px[tri[:, 2]], py[tri[:, 2]]
    den = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    den = torch.where(den.abs() < 1e-12, torch.full_like(den, 1e-12), den)
    dx, dy = x - x0, y - y0
    b1 = (dx * (y2 - y0) - (x2 - x0) * dy) / den
    b2 = ((x1 - x0) * dy - dx * (y1 - y0)) / den
    return torch.stack([1 - b1 - b2, b1, b2], dim=-1)


def edge_neighbours(faces: torch.Tensor) -> torch.Tensor:
    """[F, 3]: the face across edge k of each face (edge k is opposite vertex k), or -1 on a boundary."""
    faces = faces.long()
    F_ = faces.shape[0]
    a = faces[:, [1, 2, 0]]
    b = faces[:, [2, 0, 1]]
    n = int(faces.max()) + 1 if F_ else 1
    key = (torch.minimum(a, b) * n + torch.maximum(a, b)).reshape(-1)  # [F*3], slot = face*3 + k
    order = torch.argsort(key)
    sorted_key = key[order]
    same = sorted_key[1:] == sorted_key[:-1]
    out = torch.full((F_ * 3,), -1, dtype=torch.long, device=faces.device)
    left, right = order[:-1][same], order[1:][same]
    out[left] = right // 3
    out[right] = left // 3
    return out.view(F_, 3)


def _silhouette_edges(px, py, faces: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """[F, 3] bool: edges whose other side is missing or faces the other way in this view."""
    x, y = px[faces], py[faces]
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    facing = area.detach() > 0
    other = facing[neighbours.clamp_min(0)]
    return (neighbours < 0) | (other != facing.unsqueeze(1))


def antialias(image: torch.Tensor, rast: Rasterization, clip: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Antialias ``image`` [B, H, W, C] (e.g. RGB with opacity as a 4th channel) rendered from ``rast``.

    Only silhouette edges (boundary edges, or edges between a front- and a back-facing triangle in this
    view) blend pixels; the segment between two pixel centres is tested against the line of such an
    edge of the front pixel's triangle."""
    B, H, W, C = image.shape
    faces = faces.long()
    neighbours = edge_neighbours(faces)
    out = []
    for b in range(B):
        px, py, _ = _screen(clip[b], H, W)
        silhouette = _silhouette_edges(px, py, faces, neighbours)
        face, depth = rast.face[b], rast.depth[b].detach()
        img = image[b].reshape(H * W, C)
        delta = torch.zeros_like(img)
        for axis in (1, 0):  # left/right, then up/down
            if axis == 1:
                fa, fb = face[:, :-1], face[:, 1:]
                da, db = depth[:, :-1], depth[:, 1:]
                rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W - 1), indexing="ij")
                ia, ib = rows * W + cols, rows * W + cols + 1
            else:
                fa, fb = face[:-1, :], face[1:, :]
                da, db = depth[:-1, :], depth[1:, :]
                rows, cols = torch.meshgrid(torch.arange(H - 1), torch.arange(W), indexing="ij")
                ia, ib = rows * W + cols, (rows + 1) * W + cols
            both = (fa >= 0) & (fb >= 0)
            jump = (da - db).abs() > DEPTH_JUMP * torch.minimum(da, db).clamp_min(1e-6)
            edge = (fa != fb) & ((fa < 0) | (fb < 0) | (both & jump))
            if not bool(edge.any()):
                continue
            fa, fb, da, db = fa[edge], fb[edge], da[edge], db[edge]
            ia, ib = ia[edge].to(img.device), ib[edge].to(img.device)
            a_front = (fb < 0) | ((fa >= 0) & (da <= db))
            front_pix = torch.where(a_front, ia, ib)
            other_pix = torch.where(a_front, ib, ia)
            front_face = torch.where(a_front, fa, fb)
            tri = faces[front_face]
            fx, fy = (front_pix % W).to(px), (front_pix // W).to(px)
            ox, oy = (other_pix % W).to(px), (other_pix // W).to(px)
            bf = _barycentrics(px, py, tri, fx, fy)
            bo = _barycentrics(px, py, tri, ox, oy)
            # the silhouette edge whose line separates the two centres (most negative on the far side)
            candidates = silhouette[front_face] & (bo.detach() < 0) & (bf.detach() >= -1e-6)
            # each edge is handled by the pairs across it: left/right pairs for steep edges, up/down for flat ones
            ex = px[tri[:, [2, 0, 1]]] - px[tri[:, [1, 2, 0]]]
            ey = py[tri[:, [2, 0, 1]]] - py[tri[:, [1, 2, 0]]]
            steep = ey.detach().abs() > ex.detach().abs()
            candidates &= steep if axis == 1 else ~steep
            score = torch.where(candidates, bo.detach(), torch.full_like(bo, float("inf")))
            k = score.argmin(dim=1, keepdim=True)
            bf_k, bo_k = bf.gather(1, k).squeeze(1), bo.gather(1, k).squeeze(1)
            crosses = candidates.any(dim=1)
            s = (bf_k / (bf_k - bo_k).clamp_min(1e-12)).clamp(0.0, 1.0)
            s = torch.where(crosses, s, torch.full_like(s, 0.5))  # no crossing found: leave both pixels
            diff = img[front_pix] - img[other_pix]  # [N, C]
            into_other = (s - 0.5).clamp_min(0.0).unsqueeze(1)
            into_front = (0.5 - s).clamp_min(0.0).unsqueeze(1)
            delta = delta.index_add(0, other_pix, into_other * diff)
            delta = delta.index_add(0, front_pix, -into_front * diff)
        out.append((img + delta).view(H, W, C))
    return torch.stack(out)
