"""NeRF renderer: cameras -> images of a hash-grid radiance field, for score distillation.

``NeRFRenderer(cfg)(cameras, H, W, shading=...)`` returns channels-first images (row 0 = top) in the
camera convention of :mod:`text3d.cameras`. The pure-PyTorch path runs anywhere; with ``backend`` ``auto``
or ``cuda`` on a CUDA machine the hash grid comes from tiny-cuda-nn and the sampling/compositing from
nerfacc when they import. The occupancy grid is always ours (a buffer), so it is saved in ``state_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from text3d.cameras import Cameras
from text3d.errors import ConfigError
from text3d.renderers import volume
from text3d.renderers.allocator import tune_malloc
from text3d.renderers.background import Background
from text3d.renderers.dmtet import SurfaceMesh
from text3d.renderers.field import DENSITY_ACTIVATIONS, NeRFField
from text3d.renderers.occupancy import OccupancyGrid
from text3d.renderers.protocol import ExportSurface, RenderOutput
from text3d.renderers.shading import SHADING_MODES, shade
from text3d.utils.backends import has_nerfacc, has_tcnn

if TYPE_CHECKING:
    from text3d.export import ExportConfig

OPACITY_FIT_RESOLUTION = 64  # the size of the views that export.fit_opacity compares


@dataclass
class NeRFConfig:
    """NeRF hyper-parameters (plain types: loaded from YAML as an OmegaConf structured config)."""

    bound: float = 1.0  # scene is the cube [-bound, bound]^3
    n_levels: int = 8  # hash grid: levels from base_resolution to max_resolution vertices per axis
    n_features_per_level: int = 2
    log2_hashmap_size: int = 16
    base_resolution: int = 16
    max_resolution: int = 256
    hidden_dim: int = 32
    n_hidden_layers: int = 1
    density_activation: str = "softplus"  # softplus | exp (truncated exp)
    blob_density: float = 10.0  # DreamFusion centre blob: + blob_density * (1 - |x| / blob_radius)
    blob_radius: float = 0.5
    # the blob fades linearly from full strength at this fraction of training to zero at blob_fade_end
    # (blob_fade_end <= blob_fade_start: never; text3d.renderers.field)
    blob_fade_start: float = 0.0
    blob_fade_end: float = 0.0
    num_samples: int = 64  # samples per ray between its box entry and exit (stratified in training)
    occupancy_resolution: int = 32
    # a cell is occupied when its density * (2*sqrt(3)*bound/num_samples) exceeds this, i.e. when one sample
    # there, at the longest bin width, would be more than about this opaque
    occupancy_threshold: float = 0.01
    occupancy_update_every: int = 16
    normals: str = "analytic"  # analytic (exact gradient of density) | finite_difference | autograd
    background: str = "learned"  # learned (small MLP of view direction) | solid
    background_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
    backend: str = "auto"  # auto | torch | cuda (nerfacc + tiny-cuda-nn when importable on CUDA)


def check_nerf_config(cfg: NeRFConfig) -> None:
    """Raise ConfigError for out-of-range values (the run config calls it before anything is created)."""
    def bad(msg: str):
        raise ConfigError(f"nerf config: {msg}")

    if cfg.bound <= 0:
        bad(f"bound must be > 0, got {cfg.bound}")
    if cfg.density_activation not in DENSITY_ACTIVATIONS:
        bad(f"density_activation must be softplus or exp, got {cfg.density_activation!r}")
    if cfg.normals not in ("analytic", "finite_difference", "autograd"):
        bad(f"normals must be analytic, finite_difference or autograd, got {cfg.normals!r}")
    if cfg.background not in ("learned", "solid"):
        bad(f"background must be learned or solid, got {cfg.background!r}")
    if cfg.backend not in ("auto", "torch", "cuda"):
        bad(f"backend must be auto, torch or cuda, got {cfg.backend!r}")
    if cfg.backend == "cuda" and not torch.cuda.is_available():
        bad("backend 'cuda' needs a CUDA GPU; use auto or torch")
    for name in ("n_levels", "n_features_per_level", "num_samples", "occupancy_resolution", "occupancy_update_every",
                 "hidden_dim"):
        if int(getattr(cfg, name)) < 1:
            bad(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 2 <= cfg.base_resolution <= cfg.max_resolution:
        bad("need 2 <= base_resolution <= max_resolution")
    if not 1 <= cfg.log2_hashmap_size <= 24:
        bad(f"log2_hashmap_size must be in [1, 24], got {cfg.log2_hashmap_size}")
    if not 0.0 <= cfg.blob_fade_start <= 1.0 or not 0.0 <= cfg.blob_fade_end <= 1.0:
        bad(f"blob_fade_start and blob_fade_end must be in [0, 1], got {cfg.blob_fade_start}, {cfg.blob_fade_end}")
    if cfg.n_hidden_layers < 0 or cfg.blob_radius <= 0 or cfg.occupancy_threshold < 0:
        bad("n_hidden_layers, blob_radius and occupancy_threshold must be non-negative (blob_radius > 0)")
    if len(tuple(cfg.background_color)) != 3:
        bad("background_color needs 3 values")


class NeRFRenderer(nn.Module):
    """Differentiable renderer of a hash-grid NeRF (see module docstring)."""

    def __init__(self, cfg: NeRFConfig | None = None):
        super().__init__()
        cfg = cfg if cfg is not None else NeRFConfig()
        check_nerf_config(cfg)
        tune_malloc()  # CPU speed: reuse large freed blocks (see text3d.renderers.allocator)
        self.cfg = cfg
        want_cuda = cfg.backend in ("auto", "cuda")
        self.use_tcnn = want_cuda and has_tcnn()
        self.use_nerfacc = want_cuda and has_nerfacc()
        self.bound = float(cfg.bound)
        self.num_samples = int(cfg.num_samples)
        self.field = NeRFField(cfg.bound, cfg.n_levels, cfg.n_features_per_level, cfg.log2_hashmap_size,
                               cfg.base_resolution, cfg.max_resolution, cfg.hidden_dim, cfg.n_hidden_layers,
                               cfg.density_activation, cfg.blob_density, cfg.blob_radius, use_tcnn=self.use_tcnn,
                               device="cuda" if self.use_tcnn else None)
        self.background = Background(cfg.background, tuple(float(c) for c in cfg.background_color))
        self.occupancy = OccupancyGrid(cfg.occupancy_resolution, cfg.bound)
        # bin width along the cube's diagonal: the longest a ray's bins can be
        self.max_step = 2.0 * math.sqrt(3.0) * self.bound / self.num_samples
        self.density_threshold = float(cfg.occupancy_threshold) / self.max_step
        self._estimator = None  # nerfacc estimator, built lazily, kept out of state_dict
        self.ray_chunk = 1 << 16  # rays rendered per chunk (bounds memory for large previews)
        self.last_stats: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ occupancy
    @torch.no_grad()
    def anneal(self, progress: float) -> None:
        """Set the centre blob's strength for the fraction ``progress`` of training done (``blob_fade_*``)."""
        start, end = float(self.cfg.blob_fade_start), float(self.cfg.blob_fade_end)
        scale = 1.0 if end <= start else min(1.0, max(0.0, (end - progress) / (end - start)))
        self.field.blob_scale.fill_(scale)

    def update_occupancy(self, step: int) -> None:
        """Refresh the occupancy grid on the first call and whenever ``step % occupancy_update_every == 0``
        (call it every training step)."""
        if bool(self.occupancy.initialized) and int(step) % int(self.cfg.occupancy_update_every) != 0:
            return
        self.occupancy.update(self.field.query_density, self.density_threshold)

    @torch.no_grad()
    def density_grid(self, resolution: int, chunk: int = 65536) -> torch.Tensor:
        """Density [res, res, res] at ``linspace(-bound, bound, res)`` along x, y, z (index [i,j,k] = (x,y,z))."""
        dev = self.occupancy.density.device
        lin = torch.linspace(-self.bound, self.bound, resolution, device=dev)
        pts = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), dim=-1).view(-1, 3)
        out = torch.cat([self.field.query_density(p).float() for p in pts.split(chunk)])
        return out.view(resolution, resolution, resolution)

    @torch.no_grad()
    def seen_albedo(self, points: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """The unshaded colour a camera sees at surface ``points`` [N, 3] -> [N, 3] in [0, 1].

        A ray arrives at each point from outside the box along the radial direction (from the origin, where
        the asset is centred, through the point) and runs on through the volume; its albedo is composited
        over the background. Where the field is opaque this is the albedo at the first surface it meets;
        where it is translucent, the background showing through is part of it, as it was in every view the
        teacher judged (translucent crimson in front of white reads pink), and baked into a texture that
        colour stays on the opaque mesh. Radial rather than along the density gradient: a hash grid's
        gradient is noisy, and rays along it speckled the texture (a red cube's judged object accuracy
        fell from 100% to 0%); on a concave part the radial ray may meet another part first.
        """
        out = []
        reach = 2.0 * math.sqrt(3.0) * self.bound
        for p in points.float().split(chunk):
            outward = F.normalize(p + 1e-6, dim=-1)
            dirs = -outward
            rays = volume.render_rays(p + reach * outward, dirs,
                                      lambda xs: dict(zip(("sigma", "rgb"), self.field(xs))),
                                      self.bound, self.num_samples, occupied=self.occupancy.occupied)
            out.append((rays["rgb"] + (1.0 - rays["opacity"]) * self.background(dirs)).clamp(0.0, 1.0))
        return torch.cat(out) if out else points.new_zeros(0, 3)

    # ------------------------------------------------------------------------- surface (renderers.protocol)
    @torch.no_grad()
    def surface(self, export: "ExportConfig | None" = None) -> SurfaceMesh:
        """The marching-cubes mesh of the density (:func:`text3d.export.extract_mesh` with ``export``'s grid,
        iso-level, small-piece and smoothing settings), float32 on this NeRF's device: where a texture stage
        started straight from the NeRF begins."""
        from text3d.export import ExportConfig

        device = self.occupancy.density.device
        mesh = self._extract(export if export is not None else ExportConfig(), device)
        return SurfaceMesh(torch.as_tensor(mesh.vertices, dtype=torch.float32, device=device),
                           torch.as_tensor(mesh.faces, device=device))

    def colour_field(self) -> NeRFField:
        """The field whose ``query_albedo`` colours the surface."""
        return self.field

    @torch.no_grad()
    def export_surface(self, export: "ExportConfig") -> ExportSurface:
        """The marching-cubes mesh (float64, as extracted) and, per ``export.bake``, the colour a camera sees at
        the surface (:meth:`seen_albedo`) or the field's albedo."""
        device = self.occupancy.density.device
        mesh = self._extract(export, device)
        colour = self.seen_albedo if export.bake == "seen" else self.field.query_albedo
        return ExportSurface(mesh, lambda p: colour(p.to(device)))  # the baker's points come from the CPU

    def _extract(self, export: "ExportConfig", device: torch.device):
        """The marching-cubes mesh of the density at ``export``'s level; with ``fit_opacity`` moved inwards by the
        offset whose silhouettes best match this NeRF's own opacity, from 8 views around at the preview elevation
        and 4 from 60 degrees up (:func:`text3d.export.extract_mesh_matching`)."""
        from text3d.export import extract_mesh, extract_mesh_matching

        if not export.fit_opacity:
            return extract_mesh(self.field.query_density, self.bound, export, device=device)
        from text3d.cameras import CameraSamplerConfig, orbit_cameras, spherical_cameras
        from text3d.renderers.mesh import MeshAsset, render_mesh

        views = CameraSamplerConfig()
        around = orbit_cameras(views, 8)
        above = spherical_cameras(60.0, torch.arange(4.0) * 90.0 + 45.0, views.eval_radius, views.eval_fovy)
        size = OPACITY_FIT_RESOLUTION
        opacity = []
        for cams in (around, above):
            opacity.append(self(cams.to(device), size, size, stratified=False)["opacity"].detach().float().cpu())
        target = torch.cat(opacity)

        def silhouettes(mesh) -> torch.Tensor:
            asset = MeshAsset(torch.as_tensor(mesh.vertices, dtype=torch.float32),
                              torch.as_tensor(mesh.faces, dtype=torch.long))
            return torch.cat([render_mesh(asset, cams, size, size, shading="albedo")["opacity"]
                              for cams in (around, above)])

        return extract_mesh_matching(self.field.query_density, self.bound, export, silhouettes, target, device=device)

    # --------------------------------------------------------------------------------------------- render
    def _nerfacc_ready(self, device: torch.device) -> bool:
        if not (self.use_nerfacc and device.type == "cuda"):
            return False
        if self._estimator is None:
            self._estimator = volume.make_nerfacc_estimator(self.bound, self.occupancy.resolution, device)
        return True

    def forward(self, cameras: Cameras, height: int, width: int, shading: str = "albedo",
                light_dirs: torch.Tensor | None = None, ambient: float = 0.3, want_normals: bool = False,
                stratified: bool | None = None,
                background_color: torch.Tensor | None = None) -> RenderOutput:
        """Render ``cameras`` at ``height x width``.

        ``shading``: albedo | lambertian | textureless; ``light_dirs`` [B,3] unit vectors towards the light
        (None: towards each camera); ``background_color`` ([3] or [B,3]) replaces the background for this call.
        Returns [B,C,H,W] images "rgb", "opacity", "depth" (expected distance of the ray's termination, 0 where
        nothing is hit), "normal" (opacity-weighted world normals, when normals are computed) and the scalars
        "opacity_sparsity" (mean opacity) and "orientation_loss" (when normals are computed)."""
        if shading not in SHADING_MODES:
            raise ConfigError(f"unknown shading {shading!r}: expected one of {', '.join(SHADING_MODES)}")
        stratified = self.training if stratified is None else bool(stratified)
        need_normals = want_normals or shading != "albedo"
        device = self.occupancy.density.device
        if self.use_tcnn and device.type != "cuda":
            raise ConfigError("this NeRF uses tiny-cuda-nn (backend auto/cuda on a CUDA machine) and must live on a "
                              "CUDA device; set nerf.backend=torch to render on the CPU")
        cameras = cameras.to(device)
        b = len(cameras)
        origins, dirs = cameras.rays(height, width)
        origins, dirs = origins.reshape(-1, 3).float(), dirs.reshape(-1, 3).float()
        n_rays, rays_per_view = origins.shape[0], height * width
        ray_light = None
        if shading != "albedo":
            if light_dirs is None:
                light = cameras.position.float()
            else:
                light = torch.as_tensor(light_dirs, dtype=torch.float32, device=device).reshape(b, 3)
            ray_light = F.normalize(light, dim=-1).repeat_interleave(rays_per_view, dim=0)  # [R, 3]

        parts, kept, candidates, orient = [], 0, 0, None
        for start in range(0, n_rays, self.ray_chunk):
            sl = slice(start, min(start + self.ray_chunk, n_rays))
            light_sl = None if ray_light is None else ray_light[sl]
            part, samples, extra = self._render_rays(origins[sl], dirs[sl], light_sl, shading, ambient, need_normals,
                                                     stratified)
            parts.append(part)
            kept, candidates = kept + samples.n_kept, candidates + samples.n_candidates
            if extra is not None:
                orient = extra if orient is None else orient + extra
        out = {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}

        bg = background_color
        if bg is not None:
            bg = torch.as_tensor(bg, dtype=torch.float32, device=device)
            if bg.dim() == 2:  # [B, 3] -> per ray
                bg = bg.repeat_interleave(rays_per_view, dim=0)
        rgb = out["rgb"] + (1.0 - out["opacity"]) * self.background(dirs, bg)

        def image(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, height, width, -1).permute(0, 3, 1, 2).contiguous()

        result: RenderOutput = {"rgb": image(rgb), "opacity": image(out["opacity"]), "depth": image(out["depth"]),
                                 "opacity_sparsity": out["opacity"].mean()}
        if need_normals:
            result["normal"] = image(out["normal"])
            result["orientation_loss"] = orient / n_rays
        self.last_stats = {"samples_kept": float(kept), "samples_in_box": float(candidates),
                           "culled_fraction": 1.0 - kept / candidates if candidates else 0.0}
        return result

    def _render_rays(self, origins, dirs, ray_light, shading, ambient, need_normals, stratified):
        """Composite one chunk of rays: per-ray "rgb" (without background), "opacity", "depth", ["normal"],
        the samples, and the chunk's summed orientation penalty (None without normals)."""
        nerfacc = self._nerfacc_ready(origins.device)
        if nerfacc:
            samples = volume.sample_rays_nerfacc(self._estimator, self.occupancy.mask, origins, dirs, self.bound,
                                                 self.num_samples, stratified)
        else:
            samples = volume.sample_rays(origins, dirs, self.bound, self.num_samples, stratified,
                                         self.occupancy.occupied)
        x = samples.positions
        normals = None
        if need_normals:
            sigma, albedo, normals = self.field.forward_with_normals(x, self.cfg.normals, create_graph=self.training)
        else:
            sigma, albedo = self.field(x)
        weights = volume.weights_nerfacc(samples, sigma) if nerfacc else volume.weights_dense(samples, sigma)
        if shading == "albedo":
            values = {"rgb": albedo}
        else:
            values = {"rgb": shade(albedo, normals, ray_light[samples.ray_idx], shading, ambient)}
        orient = None
        if normals is not None:
            values["normal"] = normals
            cos = (normals * dirs[samples.ray_idx]).sum(dim=-1).clamp_min(0.0)
            orient = (weights.detach() * cos * cos).sum()
        return volume.composite(weights, samples, values, use_nerfacc=nerfacc), samples, orient

