"""Settings of the export layer (mesh extraction, UV atlas, texture bake, turntable video)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from text3d.errors import ConfigError


@dataclass
class ExportConfig:
    """Export settings; plain types only so OmegaConf can build it from YAML.

    ``threshold`` is the density iso-level of the surface (inside = density above it). ``None``
    picks it automatically from the density grid, see :func:`text3d.export.marching.auto_threshold`.
    ``fit_opacity`` moves a NeRF's surface inwards by the offset of :data:`~text3d.export.marching.SURFACE_OFFSETS`
    whose silhouettes best match the NeRF's own rendered opacity (:func:`text3d.export.marching.extract_mesh_matching`;
    mesh stages' surfaces are their own and are not moved).
    ``max_faces`` is the decimation target of every exported mesh (quadric edge collapse, 0 = keep all).
    """

    grid_resolution: int = 128
    threshold: Optional[float] = None
    fit_opacity: bool = False  # a NeRF's surface moved inwards to match its rendered opacity (see above)
    min_component_fraction: float = 0.05
    texture_size: int = 512
    seam_padding: int = 4
    max_faces: int = 20000  # 20k: xatlas's unwrap 2.5x faster than at 50k, geometry scores unchanged (docs/guidance.md)
    fill_cavities: bool = True  # fill closed empty pockets inside the surface before marching cubes: no camera sees
    #                             them, and their inner shells would be hidden faces (text3d.export.marching)
    smooth_iterations: int = 50  # Taubin smoothing steps on the extracted mesh (0 = none); removes the voxel-scale
    #                             roughness a hash-grid density leaves on the iso-surface, keeping its volume
    video_frames: int = 48
    video_fps: int = 24
    video_resolution: int = 128
    stage_meshes: bool = False  # also export the mesh of each stage that a later stage continues (stages/<stage>/,
    #                             its own viewer on the run page): about 10 s more a stage on 2 CPU cores
    bake: str = "seen"  # NeRF texture: seen (the colour a camera sees at the surface, background showing
    #                     through translucent parts; text3d.renderers.nerf.NeRFRenderer.seen_albedo) | albedo


def check_export_config(cfg: Any) -> None:
    """Raise :class:`ConfigError` for out-of-range values (works on the dataclass and on a DictConfig)."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"export.{key} = {getattr(cfg, key)!r}: {what}")

    need(8 <= int(cfg.grid_resolution) <= 1024, "grid_resolution", "must be between 8 and 1024")
    if cfg.threshold is not None:
        need(float(cfg.threshold) == float(cfg.threshold), "threshold", "must be a number or null")
    need(0.0 <= float(cfg.min_component_fraction) <= 1.0, "min_component_fraction", "must be in [0, 1]")
    need(8 <= int(cfg.texture_size) <= 8192, "texture_size", "must be between 8 and 8192")
    need(str(getattr(cfg, "bake", "seen")) in ("seen", "albedo"), "bake", "must be seen or albedo")
    need(0 <= int(cfg.seam_padding) <= 64, "seam_padding", "must be between 0 and 64")
    need(0 <= int(cfg.smooth_iterations) <= 1000, "smooth_iterations", "must be between 0 and 1000")
    need(int(cfg.max_faces) == 0 or int(cfg.max_faces) >= 4, "max_faces", "must be 0 (never decimate) or >= 4")
    need(int(cfg.video_frames) >= 1, "video_frames", "must be >= 1")
    need(int(cfg.video_fps) >= 1, "video_fps", "must be >= 1")
    need(16 <= int(cfg.video_resolution) <= 4096, "video_resolution", "must be between 16 and 4096")
