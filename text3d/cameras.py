"""The one camera convention of text3d, random spherical cameras, rays and view labels.

Convention (used by every renderer, the export and the glTF files):
  * World frame: right-handed, +Y up, the asset's front faces +Z (glTF's convention, so export
    needs no axis swap). The asset lives inside the cube [-bound, bound]^3 centred at the origin.
  * A camera sits on a sphere around the origin at ``radius`` and looks at the origin.
    Its position is ``(r cos(el) sin(az), r sin(el), r cos(el) cos(az))`` with elevation ``el``
    and azimuth ``az`` in degrees: az = 0 looks at the front (+Z), az = +90 at the +X side,
    |az| = 180 at the back, el = 90 straight down from above.
  * Camera frame: OpenGL style, x right, y up, the camera looks along its -z axis.
    ``c2w`` is the 4x4 camera-to-world matrix whose columns are (right, up, back, position).
  * ``fovy`` is the vertical field of view in degrees; pixels are square.
  * Images are [B, C, H, W] tensors, row 0 at the top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

VIEW_LABELS = ("front", "side", "back", "overhead")


@dataclass
class CameraSamplerConfig:
    """Ranges of the random training cameras (degrees for angles)."""

    radius: tuple[float, float] = (2.6, 3.0)
    elevation: tuple[float, float] = (-10.0, 45.0)
    azimuth: tuple[float, float] = (-180.0, 180.0)
    fovy: tuple[float, float] = (40.0, 45.0)
    # view labels: |az| <= front_half_angle is front, |az| >= 180 - back_half_angle is back
    front_half_angle: float = 45.0
    back_half_angle: float = 45.0
    overhead_elevation: float = 60.0
    # the camera used for previews and the turntable
    eval_radius: float = 2.8
    eval_elevation: float = 15.0
    eval_fovy: float = 42.0


@dataclass
class Cameras:
    """A batch of B pinhole cameras looking at the origin."""

    c2w: torch.Tensor  # [B, 4, 4]
    fovy: torch.Tensor  # [B] degrees
    elevation: torch.Tensor  # [B] degrees
    azimuth: torch.Tensor  # [B] degrees, wrapped to (-180, 180]
    radius: torch.Tensor  # [B]
    extras: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def position(self) -> torch.Tensor:
        return self.c2w[:, :3, 3]

    def to(self, device: torch.device | str) -> "Cameras":
        return Cameras(self.c2w.to(device), self.fovy.to(device), self.elevation.to(device),
                       self.azimuth.to(device), self.radius.to(device), dict(self.extras))

    def __getitem__(self, idx) -> "Cameras":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return Cameras(self.c2w[idx], self.fovy[idx], self.elevation[idx], self.azimuth[idx], self.radius[idx],
                       dict(self.extras))

    def rays(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray origins and unit directions in world space, each [B, H, W, 3], through pixel centres."""
        device, dtype = self.c2w.device, self.c2w.dtype
        focal = 0.5 * height / torch.tan(0.5 * torch.deg2rad(self.fovy.to(dtype)))  # [B]
        j, i = torch.meshgrid(torch.arange(height, device=device, dtype=dtype) + 0.5,
                              torch.arange(width, device=device, dtype=dtype) + 0.5, indexing="ij")
        x = (i - 0.5 * width)[None] / focal[:, None, None]
        y = -(j - 0.5 * height)[None] / focal[:, None, None]
        dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [B, H, W, 3]
        dirs = torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], dirs_cam)
        dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        origins = self.c2w[:, None, None, :3, 3].expand_as(dirs)
        return origins, dirs

    def view_labels(self, cfg: CameraSamplerConfig | None = None) -> list[str]:
        return [view_label(float(e), float(a), cfg) for e, a in zip(self.elevation.tolist(), self.azimuth.tolist())]


def wrap_azimuth(az: torch.Tensor) -> torch.Tensor:
    """Wrap degrees into (-180, 180]."""
    return 180.0 - torch.remainder(180.0 - az, 360.0)


def look_at_origin(position: torch.Tensor) -> torch.Tensor:
    """Camera-to-world matrices [B, 4, 4] for cameras at ``position`` [B, 3] looking at the origin, +Y up."""
    back = position / position.norm(dim=-1, keepdim=True)  # camera +z points away from the target
    world_up = torch.tensor([0.0, 1.0, 0.0], dtype=position.dtype, device=position.device).expand_as(back)
    right = torch.cross(world_up, back, dim=-1)
    # looking straight up/down: pick +X as right so the frame stays defined
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    fallback = torch.tensor([1.0, 0.0, 0.0], dtype=position.dtype, device=position.device).expand_as(right)
    right = torch.where(degenerate, fallback, right)
    right = right / right.norm(dim=-1, keepdim=True)
    up = torch.cross(back, right, dim=-1)
    c2w = torch.zeros(position.shape[0], 4, 4, dtype=position.dtype, device=position.device)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, up, back, position
    c2w[:, 3, 3] = 1.0
    return c2w


def spherical_cameras(elevation, azimuth, radius, fovy, device=None) -> Cameras:
    """Cameras from per-view elevation/azimuth/radius/fovy (degrees; scalars or 1-D tensors broadcast)."""
    el, az, r, fov = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.float32, device=device).reshape(-1)
                                               for v in (elevation, azimuth, radius, fovy)))
    el_r, az_r = torch.deg2rad(el), torch.deg2rad(az)
    position = torch.stack([r * torch.cos(el_r) * torch.sin(az_r), r * torch.sin(el_r),
                            r * torch.cos(el_r) * torch.cos(az_r)], dim=-1)
    return Cameras(look_at_origin(position), fov.clone(), el.clone(), wrap_azimuth(az), r.clone())


def sample_cameras(cfg: CameraSamplerConfig, batch_size: int, generator: torch.Generator | None = None,
                   device=None) -> Cameras:
    """Random training cameras, uniform in each range (elevation uniform in angle)."""

    def uniform(lo_hi):
        lo, hi = lo_hi
        return lo + (hi - lo) * torch.rand(batch_size, generator=generator)

    cams = spherical_cameras(uniform(cfg.elevation), uniform(cfg.azimuth), uniform(cfg.radius), uniform(cfg.fovy))
    return cams.to(device) if device is not None else cams


def orbit_cameras(cfg: CameraSamplerConfig, n_views: int, elevation: float | None = None, device=None) -> Cameras:
    """``n_views`` cameras evenly spaced in azimuth starting at the front: previews and turntables."""
    az = torch.arange(n_views, dtype=torch.float32) * (360.0 / n_views)
    el = cfg.eval_elevation if elevation is None else elevation
    return spherical_cameras(el, az, cfg.eval_radius, cfg.eval_fovy, device=device)


CAMERA_FEATURES = 16  # the length of camera_features


def camera_features(cameras: Cameras) -> torch.Tensor:
    """[B, 16]: each camera as its flattened camera-to-world matrix (MVDream's camera input), the one camera
    input of every camera-conditioned network here (VSD's LoRA, a view-aware teacher). Its last row is
    ``0, 0, 0, 1``, so the all-zero vector, which stands for "no camera" (dropped in training, or a caller
    without one), is never a camera."""
    return cameras.c2w.reshape(cameras.c2w.shape[0], -1).float()


VIEW_AZIMUTHS = {"front": 0.0, "side": 90.0, "back": 180.0, "overhead": 0.0}


def view_features(labels, cfg: CameraSamplerConfig | None = None) -> torch.Tensor:
    """[B, 16] :func:`camera_features` of the typical camera of each view label (front, side, back: azimuth 0,
    90, 180 at the eval elevation; overhead: 15 degrees above its threshold), zeros ("no camera") for None."""
    cfg = cfg or CameraSamplerConfig()
    rows = []
    for label in labels:
        if label is None:
            rows.append(torch.zeros(CAMERA_FEATURES))
            continue
        elevation = cfg.overhead_elevation + 15.0 if label == "overhead" else cfg.eval_elevation
        cams = spherical_cameras(elevation, VIEW_AZIMUTHS[label], cfg.eval_radius, cfg.eval_fovy)
        rows.append(camera_features(cams)[0])
    return torch.stack(rows)


def view_label(elevation: float, azimuth: float, cfg: CameraSamplerConfig | None = None) -> str:
    """DreamFusion's view label of a camera: overhead, front, side or back."""
    cfg = cfg or CameraSamplerConfig()
    if elevation >= cfg.overhead_elevation:
        return "overhead"
    az = abs(float(wrap_azimuth(torch.tensor(float(azimuth)))))
    if az <= cfg.front_half_angle:
        return "front"
    if az >= 180.0 - cfg.back_half_angle:
        return "back"
    return "side"


def reachable_view_labels(cfg: CameraSamplerConfig | None = None) -> list[str]:
    """The view labels that cameras drawn from ``cfg``'s ranges can get, in :data:`VIEW_LABELS` order
    ("overhead" depends on the elevation alone, the others on the azimuth alone, which is scanned on a
    quarter-degree grid, ends included).

    With the default ranges (elevation up to 45 degrees, overhead from 60) no camera is "overhead", so
    neither the training renders nor ``generate``'s prompts ever say "overhead view"."""
    cfg = cfg or CameraSamplerConfig()
    (el_lo, el_hi), (az_lo, az_hi) = cfg.elevation, cfg.azimuth
    seen = set()
    if el_lo < cfg.overhead_elevation:
        grid = torch.linspace(az_lo, az_hi, max(2, int(4 * (az_hi - az_lo)) + 1)).tolist()
        seen |= {view_label(el_lo, a, cfg) for a in grid}
    if el_hi >= cfg.overhead_elevation:
        seen.add("overhead")
    return [label for label in VIEW_LABELS if label in seen]


def jittered_light_dirs(cameras: Cameras, max_deg: float) -> torch.Tensor:
    """Unit vectors towards the light: each camera's direction tilted by a random angle up to ``max_deg``."""
    towards_camera = cameras.position / cameras.position.norm(dim=-1, keepdim=True)
    random_dir = torch.randn(towards_camera.shape).to(towards_camera)
    perpendicular = random_dir - (random_dir * towards_camera).sum(-1, keepdim=True) * towards_camera
    perpendicular = perpendicular / perpendicular.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    angle = torch.deg2rad(torch.rand(len(cameras)) * max_deg).to(towards_camera)[:, None]
    return torch.cos(angle) * towards_camera + torch.sin(angle) * perpendicular


def intrinsics_focal(fovy_deg: float, height: int) -> float:
    return 0.5 * height / math.tan(0.5 * math.radians(fovy_deg))
