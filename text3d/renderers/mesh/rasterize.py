"""A pure-PyTorch triangle rasteriser with a z-buffer and differentiable barycentrics.

Pixel (row r, column c) has its centre at NDC ``x = (2c + 1) / W - 1``, ``y = 1 - (2r + 1) / H``
(row 0 at the top, as everywhere in text3d). Coverage is decided at pixel centres with a top-left-free
inclusive edge test, visibility by the smallest NDC depth. Which triangle covers a pixel is found
without gradients; the barycentric coordinates of the winner are then recomputed with autograd from
the projected vertices (perspective-correct), so interpolated attributes are differentiable with
respect to the vertex positions and the attributes themselves. Silhouette edges are not (that needs
antialiasing, as in nvdiffrast).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from text3d.cameras import Cameras

_MAX_CANDIDATES = 1 << 22  # (triangle, pixel) pairs tested per batch: bounds memory


@dataclass
class Rasterization:
    face: torch.Tensor  # [B, H, W] int64, -1 where no triangle covers the pixel
    bary: torch.Tensor  # [B, H, W, 3] perspective-correct barycentrics (0 where empty), differentiable
    depth: torch.Tensor  # [B, H, W] camera-space distance along -z (0 where empty)

    @property
    def mask(self) -> torch.Tensor:
        return (self.face >= 0).unsqueeze(1).float()  # [B, 1, H, W]


def projection_matrix(fovy_deg: torch.Tensor, near: float, far: float) -> torch.Tensor:
    """OpenGL perspective matrices [B, 4, 4] for square pixels and aspect 1."""
    f = 1.0 / torch.tan(0.5 * torch.deg2rad(fovy_deg))
    proj = torch.zeros(fovy_deg.shape[0], 4, 4, dtype=fovy_deg.dtype, device=fovy_deg.device)
    proj[:, 0, 0] = f
    proj[:, 1, 1] = f
    proj[:, 2, 2] = (far + near) / (near - far)
    proj[:, 2, 3] = 2 * far * near / (near - far)
    proj[:, 3, 2] = -1.0
    return proj


def project(vertices: torch.Tensor, cameras: Cameras, near: float = 0.1, far: float = 100.0) -> torch.Tensor:
    """World-space vertices [V, 3] or [B, V, 3] -> clip-space [B, V, 4] for each camera (width = height)."""
    if vertices.dim() == 2:
        vertices = vertices.unsqueeze(0).expand(len(cameras), -1, -1)
    homogeneous = F.pad(vertices, (0, 1), value=1.0)
    w2c = torch.linalg.inv(cameras.c2w.to(vertices))
    mvp = projection_matrix(cameras.fovy.to(vertices), near, far) @ w2c
    return homogeneous @ mvp.transpose(1, 2)


def _screen(clip: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clip [V, 4] -> pixel x (column units, centres at integers), pixel y (row units), NDC z, each [V]."""
    w = clip[:, 3]
    ndc = clip[:, :3] / w.unsqueeze(-1)
    px = (ndc[:, 0] + 1.0) * 0.5 * width - 0.5
    py = (1.0 - ndc[:, 1]) * 0.5 * height - 0.5
    return px, py, ndc[:, 2]


def _visible_faces(clip: torch.Tensor, faces: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per pixel, the index of the nearest covering face (or -1), for one view. No gradients."""
    px, py, pz = _screen(clip, height, width)
    w = clip[:, 3]
    tri_ok = (w[faces] > 1e-6).all(dim=1)  # triangles crossing the camera plane are skipped
    tx, ty, tz = px[faces], py[faces], pz[faces]  # [F, 3]
    x0, y0, x1, y1, x2, y2 = tx[:, 0], ty[:, 0], tx[:, 1], ty[:, 1], tx[:, 2], ty[:, 2]
    den = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    tri_ok &= den.abs() > 1e-12
    lo_x = tx.min(1).values.ceil().clamp(0, width - 1).long()
    hi_x = tx.max(1).values.floor().clamp(-1, width - 1).long()
    lo_y = ty.min(1).values.ceil().clamp(0, height - 1).long()
    hi_y = ty.max(1).values.floor().clamp(-1, height - 1).long()
    bw = (hi_x - lo_x + 1).clamp_min(0) * tri_ok
    bh = (hi_y - lo_y + 1).clamp_min(0) * tri_ok
    counts = bw * bh
    n_pix = height * width
    best_depth = torch.full((n_pix,), float("inf"), device=clip.device)
    best_face = torch.full((n_pix,), -1, dtype=torch.long, device=clip.device)
    cum = torch.cumsum(counts, 0)
    start, n_faces = 0, faces.shape[0]
    while start < n_faces:
        base = int(cum[start - 1]) if start else 0
        stop = max(start + 1, int(torch.searchsorted(cum, torch.tensor(base + _MAX_CANDIDATES, device=cum.device),
                                                     right=True)))
        f_idx = torch.arange(start, min(stop, n_faces), device=clip.device)
        n = counts[f_idx]
        owner = torch.repeat_interleave(f_idx, n)
        start = stop
        if owner.numel() == 0:
            continue
        local = torch.arange(owner.numel(), device=clip.device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        cx = lo_x[owner] + local % bw[owner]
        cy = lo_y[owner] + local // bw[owner]
        dx, dy = cx - x0[owner], cy - y0[owner]
        d = den[owner]
        l1 = (dx * (y2[owner] - y0[owner]) - (x2[owner] - x0[owner]) * dy) / d
        l2 = ((x1[owner] - x0[owner]) * dy - dx * (y1[owner] - y0[owner])) / d
        l0 = 1.0 - l1 - l2
        inside = (l0 >= -1e-6) & (l1 >= -1e-6) & (l2 >= -1e-6)
        z = l0 * tz[owner, 0] + l1 * tz[owner, 1] + l2 * tz[owner, 2]
        inside &= (z >= -1.0) & (z <= 1.0)
        owner, z, pix = owner[inside], z[inside], (cy * width + cx)[inside]
        if owner.numel() == 0:
            continue
        # z-buffer: the smallest depth per pixel wins; ties go to the larger face index (deterministic).
        # A pixel whose depth improved in this batch forgets the face an earlier batch chose for it.
        previous = best_depth
        best_depth = best_depth.scatter_reduce(0, pix, z, reduce="amin")
        best_face = torch.where(best_depth < previous, torch.full_like(best_face, -1), best_face)
        winner = z <= best_depth[pix]
        best_face = best_face.scatter_reduce(0, pix[winner], owner[winner], reduce="amax")
    return best_face.view(height, width)


def rasterize(clip: torch.Tensor, faces: torch.Tensor, height: int, width: int) -> Rasterization:
    """Rasterise clip-space vertices [B, V, 4] with triangles ``faces`` [F, 3] into [B, H, W]."""
    faces = faces.long()
    face_maps, barys, depths = [], [], []
    for b in range(clip.shape[0]):
        with torch.no_grad():
            face_map = _visible_faces(clip[b].detach().float(), faces, height, width)
        flat = face_map.reshape(-1)
        covered = torch.nonzero(flat >= 0).squeeze(1)
        f = flat[covered]
        px, py, _ = _screen(clip[b], height, width)
        w = clip[b, :, 3]
        tri = faces[f]
        x0, y0, x1, y1, x2, y2 = px[tri[:, 0]], py[tri[:, 0]], px[tri[:, 1]], py[tri[:, 1]], px[tri[:, 2]], py[tri[:, 2]]
        cx, cy = (covered % width).to(px), (covered // width).to(px)
        den = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        dx, dy = cx - x0, cy - y0
        s1 = (dx * (y2 - y0) - (x2 - x0) * dy) / den
        s2 = ((x1 - x0) * dy - dx * (y1 - y0)) / den
        screen_bary = torch.stack([1 - s1 - s2, s1, s2], dim=-1)
        # perspective correction: weights divided by w, renormalised
        inv_w = 1.0 / w[tri]
        persp = screen_bary * inv_w
        persp = persp / persp.sum(-1, keepdim=True)
        depth = (persp * w[tri]).sum(-1)  # camera distance along -z equals clip w
        bary = torch.zeros(height * width, 3, dtype=persp.dtype, device=persp.device)
        bary = bary.index_put((covered,), persp)
        dmap = torch.zeros(height * width, dtype=persp.dtype, device=persp.device).index_put((covered,), depth)
        face_maps.append(face_map)
        barys.append(bary.view(height, width, 3))
        depths.append(dmap.view(height, width))
    return Rasterization(torch.stack(face_maps), torch.stack(barys), torch.stack(depths))


def interpolate(attributes: torch.Tensor, rast: Rasterization, faces: torch.Tensor) -> torch.Tensor:
    """Per-vertex attributes [V, C] or [B, V, C] -> per-pixel [B, H, W, C] (0 where empty)."""
    B, H, W = rast.face.shape
    if attributes.dim() == 2:
        attributes = attributes.unsqueeze(0).expand(B, -1, -1)
    face = rast.face.clamp_min(0).view(B, -1)
    tri = faces.long()[face]  # [B, HW, 3]
    gathered = torch.gather(attributes, 1, tri.view(B, -1, 1).expand(-1, -1, attributes.shape[-1]))
    gathered = gathered.view(B, H * W, 3, -1)
    out = (gathered * rast.bary.view(B, H * W, 3, 1)).sum(2)
    return out.view(B, H, W, -1) * (rast.face >= 0).unsqueeze(-1)


def sample_texture(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup: texture [Ht, Wt, C] (row 0 = v 1, the OBJ/glTF-as-loaded convention), uv [B, H, W, 2]."""
    tex = texture.permute(2, 0, 1).unsqueeze(0).expand(uv.shape[0], -1, -1, -1)
    grid = torch.stack([uv[..., 0] * 2 - 1, 1 - uv[..., 1] * 2], dim=-1)
    return F.grid_sample(tex, grid, mode="bilinear", padding_mode="border", align_corners=False).permute(0, 2, 3, 1)
