"""Texture baking: rasterise triangles in UV space, query a colour field at their 3D points, pad seams.

Texel ``(row r, column c)`` of a ``size x size`` texture has its centre at
``u = (c + 0.5) / size`` and ``v = 1 - (r + 0.5) / size``: row 0 is the top of the image (v = 1),
which is how OBJ viewers and trimesh's loaders (and glTF after its v flip) read a texture.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

ColorFn = Callable[[torch.Tensor], torch.Tensor]
CHUNK = 65536
_MAX_CANDIDATES = 1 << 22  # texel candidates tested per rasterisation batch (bounds memory)


def uv_to_pixel(uvs: np.ndarray, size: int) -> np.ndarray:
    """UVs -> continuous pixel coordinates (x = column, y = row) where integer values are texel centres."""
    uvs = np.asarray(uvs, dtype=np.float64)
    return np.stack([uvs[:, 0] * size - 0.5, (1.0 - uvs[:, 1]) * size - 0.5], axis=1)


def rasterize_uv(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray,
                 size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every texel whose centre lies inside a UV triangle, with the matching 3D point.

    Returns ``(texel index r*size + c [M] int64, points [M,3] float32, face index [M] int64)``, each
    texel once. Vectorised over triangles: each triangle's bounding box of texel centres is expanded
    with ``np.repeat`` and tested with barycentric coordinates in one batch. Triangles too small to
    contain any texel centre are splatted to the texel under their centroid (if it is still empty),
    so tiny islands are not lost.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    pix = uv_to_pixel(uvs, size)
    tri = pix[faces]  # [F, 3, 2]
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    den = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
    valid = np.abs(den) > 1e-12
    lo = np.clip(np.ceil(tri.min(axis=1) - 1e-9), 0, size - 1).astype(np.int64)  # [F, 2] (x, y)
    hi = np.clip(np.floor(tri.max(axis=1) + 1e-9), 0, size - 1).astype(np.int64)
    # a triangle between texel centres has hi < lo on some axis: no candidates
    width = np.where(valid, hi[:, 0] - lo[:, 0] + 1, 0).clip(min=0)
    height = np.where(valid, hi[:, 1] - lo[:, 1] + 1, 0).clip(min=0)
    counts = width * height

    texel_out, point_out, face_out = [], [], []
    hits_per_face = np.zeros(len(faces), dtype=np.int64)
    cum = np.cumsum(counts)
    start = 0
    while start < len(faces):
        # batch of faces whose candidate total stays under the cap (at least one face)
        base = cum[start - 1] if start else 0
        stop = int(np.searchsorted(cum, base + _MAX_CANDIDATES, side="right"))
        stop = max(stop, start + 1)
        f_idx = np.arange(start, stop)
        n = counts[f_idx]
        owner = np.repeat(f_idx, n)
        if owner.size:
            local = np.arange(owner.size) - np.repeat(np.cumsum(n) - n, n)
            w = width[owner]
            px = lo[owner, 0] + local % w
            py = lo[owner, 1] + local // w
            ax, ay = a[owner, 0], a[owner, 1]
            dx, dy = px - ax, py - ay
            d = den[owner]
            l1 = (dx * (c[owner, 1] - ay) - (c[owner, 0] - ax) * dy) / d
            l2 = ((b[owner, 0] - ax) * dy - dx * (b[owner, 1] - ay)) / d
            l0 = 1.0 - l1 - l2
            eps = -1e-7
            inside = (l0 >= eps) & (l1 >= eps) & (l2 >= eps)
            owner, px, py = owner[inside], px[inside], py[inside]
            bary = np.stack([l0[inside], l1[inside], l2[inside]], axis=1).clip(0.0, 1.0)
            bary /= bary.sum(axis=1, keepdims=True)
            pts = np.einsum("nk,nkd->nd", bary, vertices[faces[owner]])
            texel_out.append(py * size + px)
            point_out.append(pts)
            face_out.append(owner)
            hits_per_face += np.bincount(owner, minlength=len(faces))
        start = stop

    texels = np.concatenate(texel_out) if texel_out else np.zeros(0, np.int64)
    points = np.concatenate(point_out) if point_out else np.zeros((0, 3))
    owners = np.concatenate(face_out) if face_out else np.zeros(0, np.int64)

    # sub-texel triangles: one sample at the centroid, on the texel under it
    missed = np.nonzero(hits_per_face == 0)[0]
    if missed.size:
        centre = tri[missed].mean(axis=1)
        cx = np.clip(np.rint(centre[:, 0]), 0, size - 1).astype(np.int64)
        cy = np.clip(np.rint(centre[:, 1]), 0, size - 1).astype(np.int64)
        texels = np.concatenate([texels, cy * size + cx])
        points = np.concatenate([points, vertices[faces[missed]].mean(axis=1)])
        owners = np.concatenate([owners, missed])

    # one sample per texel (texels on shared edges are hit twice; the first hit wins)
    texels, first = np.unique(texels, return_index=True)
    return texels, points[first].astype(np.float32), owners[first]


def evaluate_colors(color_fn: ColorFn, points: np.ndarray, device: Optional[torch.device | str] = None,
                    chunk: int = CHUNK) -> np.ndarray:
    """``color_fn`` on ``points`` in chunks under ``torch.no_grad``; returns float32 [N, 3] clipped to [0, 1]."""
    out = np.zeros((len(points), 3), dtype=np.float32)
    with torch.no_grad():
        for s in range(0, len(points), chunk):
            p = torch.from_numpy(np.ascontiguousarray(points[s:s + chunk], dtype=np.float32))
            if device is not None:
                p = p.to(device)
            col = color_fn(p).detach().float().cpu().reshape(p.shape[0], -1)[:, :3].numpy()
            out[s:s + len(col)] = col
    return np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0).clip(0.0, 1.0)


def dilate(image: np.ndarray, mask: np.ndarray, padding: int) -> np.ndarray:
    """Copy into each empty texel within ``padding`` texels (chessboard distance) its nearest filled texel's colour.

    Texels farther away get the mean colour of the filled texels, so mipmaps of the texture do not
    fade to black at the island borders either.
    """
    from scipy.ndimage import distance_transform_cdt

    out = image.copy()
    if not mask.any():
        return out
    empty = ~mask
    if not empty.any():
        return out
    mean = image[mask].mean(axis=0)
    if padding > 0:
        dist, (ri, ci) = distance_transform_cdt(empty, metric="chessboard", return_indices=True)
        near = empty & (dist <= padding)
        out[near] = image[ri[near], ci[near]]
        empty = empty & ~near
    out[empty] = mean
    return out


def bake_texture(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, color_fn: ColorFn, size: int,
                 padding: int, device: Optional[torch.device | str] = None) -> np.ndarray:
    """Bake ``color_fn`` (points torch[N,3] -> colours torch[N,3] in [0, 1]) into a ``size x size`` RGB texture.

    Each texel covered by a triangle in UV space gets the colour at its barycentric 3D point; then
    colours are dilated ``padding`` texels past the island borders (see :func:`dilate`). Returns
    uint8 ``[size, size, 3]`` with row 0 = v = 1 (top).
    """
    size = int(size)
    texels, points, _ = rasterize_uv(vertices, faces, uvs, size)
    colors = evaluate_colors(color_fn, points, device=device)
    image = np.zeros((size * size, 3), dtype=np.float32)
    mask = np.zeros(size * size, dtype=bool)
    image[texels] = colors
    mask[texels] = True
    image = dilate(image.reshape(size, size, 3), mask.reshape(size, size), int(padding))
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
