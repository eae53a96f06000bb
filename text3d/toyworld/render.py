"""Rendering of toyworld objects with the project's own volume renderer and Lambertian shading.

An object's SDF becomes a density ``sigma(x) = SIGMA_MAX * sigmoid(-sdf(x) / SDF_SOFTNESS)``: about
``SIGMA_MAX`` inside, ~0 outside, with a transition ``SDF_SOFTNESS`` wide (a fraction of a pixel at 64x64)
which also anti-aliases silhouettes. Each object's rays are cut to a cube ``[-b, b]^3`` just holding it
(``b <= BOUND``) and sampled at bin midpoints by :func:`text3d.renderers.volume.sample_rays` (deterministic:
no jitter), with ``ceil(NUM_SAMPLES * b / BOUND)`` bins so the bin width doesn't depend on the object;
weights and colours come from :func:`~text3d.renderers.volume.weights_dense` /
:func:`~text3d.renderers.volume.composite`. Empty space and the deep interior are culled by a per-object
:class:`~text3d.renderers.occupancy.OccupancyGrid` whose mask is built conservatively from the SDF (every
SDF here is 1-Lipschitz, being exact distances and minima/maxima of them, so within a cell it differs from
its value at the centre by at most the half diagonal): the SDF is only evaluated in a thin band around the
surface, and only rays passing within the object's bounding sphere are traced.

Colour of a sample: the albedo of the part whose SDF is smallest there (the caption's colour or the part's
fixed colour), shaded by :func:`text3d.renderers.shading.shade`
(``albedo * (ambient + (1 - ambient) * max(0, n.l))``) with the normal the normalised SDF gradient
(tetrahedral finite differences). Shading and normals are computed only for samples whose compositing weight
matters. The background is a solid colour (white by default, like the NeRF's solid background).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

from text3d.cameras import Cameras
from text3d.renderers import volume
from text3d.renderers.allocator import tune_malloc
from text3d.renderers.occupancy import OccupancyGrid
from text3d.renderers.shading import shade
from text3d.toyworld.catalog import COLOURS, OBJECTS, ToyObject

BOUND = 0.65  # objects fit in a sphere of radius ~0.6; rays are sampled inside [-BOUND, BOUND]^3
NUM_SAMPLES = 128  # per ray across [-BOUND, BOUND]^3: bins of at most 2*sqrt(3)*BOUND/128 ~ 0.018
SIGMA_MAX = 400.0  # density inside an object: a 0.02 thick shell is opaque (optical depth 8)
SDF_SOFTNESS = 0.004  # sigmoid width of the surface, in world units (a pixel is ~0.034 at the eval camera)
GRID_RESOLUTION = 96  # culling grid cells per axis (a multiple of 4: built coarse to fine)
OUTSIDE_MARGIN = 8 * SDF_SOFTNESS  # beyond this outside the surface, density < SIGMA_MAX * 3.4e-4
INSIDE_MARGIN = 0.03  # deeper than this inside, samples are behind an opaque shell (optical depth > 10): culled
WEIGHT_EPS = 5e-4  # samples with smaller compositing weights are not shaded (their colour counts as 0)
NORMAL_EPS = 1e-3  # finite-difference step of the SDF gradient
DEFAULT_AMBIENT = 0.3
RAY_CHUNK = 1 << 15


def sdf_density(sdf: torch.Tensor) -> torch.Tensor:
    """Density of the volume whose signed distance is ``sdf`` (see the module docstring)."""
    return SIGMA_MAX * torch.sigmoid(sdf * (-1.0 / SDF_SOFTNESS))


def sdf_normals(obj: ToyObject, x: torch.Tensor) -> torch.Tensor:
    """Unit outward normals [M, 3]: the SDF gradient by tetrahedral central differences (4 evaluations)."""
    k = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, 1.0, 1.0]], dtype=x.dtype,
                     device=x.device)
    pts = (x.unsqueeze(0) + NORMAL_EPS * k.unsqueeze(1)).reshape(-1, 3)
    d = obj.sdf(pts).view(4, -1, 1)
    grad = (d * k.unsqueeze(1)).sum(dim=0)
    return F.normalize(grad, dim=-1, eps=1e-12)


@dataclass(frozen=True)
class ObjectGrid:
    """An object's rendering cube ``[-bound, bound]^3`` (its extent plus a margin) and culling grid."""

    bound: float
    num_samples: int  # per ray across the cube: bins no wider than those of NUM_SAMPLES across BOUND
    occupancy: OccupancyGrid


def _band_cells(obj: ToyObject, grid: OccupancyGrid, candidates: torch.Tensor | None) -> torch.Tensor:
    """Flat indices of the cells (among ``candidates``, or all) that the SDF band may cross: a 1-Lipschitz
    ``d`` can't change by more than the half diagonal within a cell."""
    centres = grid.cell_points(jitter=False)
    if candidates is not None:
        centres = centres[candidates]
    d = obj.sdf(centres)
    half_diag = math.sqrt(3.0) * grid.bound / grid.resolution
    keep = (d <= OUTSIDE_MARGIN + half_diag) & (d >= -INSIDE_MARGIN - half_diag)
    idx = keep.nonzero().squeeze(1)
    return idx if candidates is None else candidates[idx]


def _children(cells: torch.Tensor, res: int, factor: int) -> torch.Tensor:
    """Flat indices at resolution ``res * factor`` of the sub-cells of flat cells at resolution ``res``."""
    i, j, k = cells // (res * res), (cells // res) % res, cells % res
    sub = torch.arange(factor)
    fi = (i[:, None] * factor + sub)[:, :, None, None]
    fj = (j[:, None] * factor + sub)[:, None, :, None]
    fk = (k[:, None] * factor + sub)[:, None, None, :]
    fine = res * factor
    return ((fi * fine + fj) * fine + fk).reshape(-1)


@lru_cache(maxsize=None)
def object_grid(name: str) -> ObjectGrid:
    """The object's culling grid over ``[-BOUND, BOUND]^3`` (built once per process, coarse to fine) and the
    smaller cube its rays are sampled in: the extent of the grid's kept cells."""
    obj = OBJECTS[name]
    with torch.no_grad():
        res = GRID_RESOLUTION // 4
        cells = _band_cells(obj, OccupancyGrid(res, BOUND), None)
        while res < GRID_RESOLUTION:
            cells = _children(cells, res, 2)
            res *= 2
            cells = _band_cells(obj, OccupancyGrid(res, BOUND), cells)
        grid = OccupancyGrid(GRID_RESOLUTION, BOUND)
        mask = torch.zeros(GRID_RESOLUTION ** 3, dtype=torch.bool)
        mask[cells] = True
        grid.mask.copy_(mask.view_as(grid.mask))
        grid.initialized.fill_(True)
        extent = float(grid.cell_points(jitter=False)[cells].abs().max()) + BOUND / GRID_RESOLUTION
    bound = min(BOUND, extent + 1e-3)
    return ObjectGrid(bound, max(8, math.ceil(NUM_SAMPLES * bound / BOUND)), grid)


@lru_cache(maxsize=None)
def bounding_radius(name: str) -> float:
    """Radius of a sphere around the origin outside which the object has no density (from its culling grid)."""
    grid = object_grid(name).occupancy
    centres = grid.cell_points(jitter=False)[grid.mask.view(-1)]
    return float(centres.norm(dim=-1).max()) + math.sqrt(3.0) * grid.bound / grid.resolution


def _as_names(names: str | Sequence[str], n: int, known: dict, what: str) -> list[str]:
    names = [names] * n if isinstance(names, str) else list(names)
    if len(names) != n:
        raise ValueError(f"{len(names)} {what} names for {n} cameras")
    for name in names:
        if name not in known:
            raise KeyError(f"unknown toyworld {what} {name!r}; known: {', '.join(known)}")
    return names


def _render_object_rays(obj: ToyObject, origins: torch.Tensor, dirs: torch.Tensor, main_albedo: torch.Tensor,
                        light: torch.Tensor, ambient: torch.Tensor,
                        num_samples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour (without background) [R, 3] and opacity [R, 1] of rays [R, 3] through one object; per-ray main
    albedo, light direction [R, 3] and ambient [R]."""
    grid = object_grid(obj.name)
    n = grid.num_samples if num_samples is None else num_samples
    samples = volume.sample_rays(origins, dirs, grid.bound, n, stratified=False, occupied=grid.occupancy.occupied)
    x = samples.positions
    part_d = obj.part_sdfs(x)  # [P, K]
    sdf, part = part_d.min(dim=0)
    weights = volume.weights_dense(samples, sdf_density(sdf))
    sel = (weights > WEIGHT_EPS).nonzero().squeeze(1)
    rgb = torch.zeros(x.shape[0], 3, dtype=x.dtype, device=x.device)
    if sel.numel():
        xs = x.index_select(0, sel)
        ray = samples.ray_idx.index_select(0, sel)
        fixed = torch.tensor([p.colour if p.colour is not None else (0.0, 0.0, 0.0) for p in obj.parts],
                             dtype=x.dtype, device=x.device)
        is_main = torch.tensor([p.colour is None for p in obj.parts], device=x.device)
        ps = part.index_select(0, sel)
        albedo = torch.where(is_main[ps].unsqueeze(1), main_albedo[ray], fixed[ps])
        normals = sdf_normals(obj, xs)
        rgb[sel] = shade(albedo, normals, light[ray], "lambertian", ambient[ray].unsqueeze(1))
    out = volume.composite(weights, samples, {"rgb": rgb})
    return out["rgb"], out["opacity"]


@torch.no_grad()
def render_objects(object_names: str | Sequence[str], colour_names: str | Sequence[str], cameras: Cameras,
                   resolution: int = 64, light_dirs: torch.Tensor | None = None,
                   ambient: float | torch.Tensor = DEFAULT_AMBIENT,
                   background: Sequence[float] = (1.0, 1.0, 1.0),
                   num_samples: int | None = None) -> dict[str, torch.Tensor]:
    """Render object ``object_names[b]`` in colour ``colour_names[b]`` through camera ``b`` (a single name is
    used for every camera).

    ``light_dirs``: [B, 3] directions towards the light (None: towards each camera), ``ambient``: a float or
    [B] per camera, ``num_samples``: bins per ray across the object's cube (None: the default bin width).
    Rendering is deterministic (no random sampling) and always runs on the CPU. Returns float32 CPU tensors
    "rgb" [B, 3, R, R] in [0, 1] (composited over ``background``) and "mask" [B, 1, R, R] (opacity)."""
    tune_malloc()
    b, res = len(cameras), int(resolution)
    objects = _as_names(object_names, b, OBJECTS, "object")
    colours = _as_names(colour_names, b, COLOURS, "colour")
    cameras = cameras.to("cpu")
    origins, dirs = cameras.rays(res, res)
    origins, dirs = origins.reshape(-1, 3).float(), dirs.reshape(-1, 3).float()
    per_view = res * res
    light = cameras.position.float() if light_dirs is None else torch.as_tensor(light_dirs, dtype=torch.float32)
    light = F.normalize(light.reshape(b, 3), dim=-1)
    amb = torch.as_tensor(ambient, dtype=torch.float32).reshape(-1).expand(b)
    albedo = torch.tensor([COLOURS[c] for c in colours], dtype=torch.float32)

    rgb = torch.zeros(b * per_view, 3)
    mask = torch.zeros(b * per_view, 1)
    for name in dict.fromkeys(objects):
        views = torch.tensor([i for i, o in enumerate(objects) if o == name])
        rays = (views.unsqueeze(1) * per_view + torch.arange(per_view)).view(-1)
        # only rays that pass near the object's bounding sphere can hit it
        o, d = origins[rays], dirs[rays]
        radius = bounding_radius(name) + 0.01
        tc = -(o * d).sum(-1)
        miss_sq = (o + tc.unsqueeze(1) * d).pow(2).sum(-1)
        rays = rays[miss_sq <= radius * radius]
        for chunk in rays.split(RAY_CHUNK):
            view = torch.div(chunk, per_view, rounding_mode="floor")
            c_rgb, c_op = _render_object_rays(OBJECTS[name], origins[chunk], dirs[chunk], albedo[view], light[view],
                                              amb[view], num_samples)
            rgb[chunk], mask[chunk] = c_rgb, c_op
    bg = torch.as_tensor(background, dtype=torch.float32).reshape(1, 3)
    rgb = (rgb + (1.0 - mask) * bg).clamp(0.0, 1.0)

    def image(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, res, res, -1).permute(0, 3, 1, 2).contiguous()

    return {"rgb": image(rgb), "mask": image(mask.clamp(0.0, 1.0))}


def to_uint8(rgb: torch.Tensor) -> torch.Tensor:
    """[B, 3, R, R] floats in [0, 1] -> [B, R, R, 3] uint8 (rounded)."""
    return (rgb.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def contact_sheet(path, colours: Sequence[str] = ("red", "green", "blue", "yellow"), resolution: int = 64,
                  azimuths: Sequence[float] = (0.0,), elevation: float | None = None, scale: int = 2):
    """Save a PNG grid: one row per object, one column per (colour, azimuth), at the eval camera."""
    import numpy as np
    from PIL import Image

    from text3d.cameras import CameraSamplerConfig, spherical_cameras

    cfg = CameraSamplerConfig()
    el = cfg.eval_elevation if elevation is None else elevation
    rows = []
    for name in OBJECTS:
        cols = [(c, az) for c in colours for az in azimuths]
        cams = spherical_cameras(el, torch.tensor([az for _, az in cols]), cfg.eval_radius, cfg.eval_fovy)
        img = to_uint8(render_objects(name, [c for c, _ in cols], cams, resolution)["rgb"]).numpy()
        rows.append(np.concatenate(list(img), axis=1))
    sheet = np.concatenate(rows, axis=0)
    im = Image.fromarray(sheet)
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path)
    return path
