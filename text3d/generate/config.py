"""The one config system: typed dataclasses, defaults from YAML in ``text3d/configs/``, overrides as ``key=value``.

Each layer owns its dataclass (``NeRFConfig`` in renderers, ``SDSConfig`` in guidance, ...);
:class:`RunConfig` composes them. Loading order: dataclass defaults < ``text3d/configs/default.yaml``
< ``--config FILE`` < CLI flags < ``key=value`` overrides. Unknown keys and values of the wrong
type or range raise :class:`~text3d.errors.ConfigError` with one line naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import OmegaConf

from text3d.cameras import CameraSamplerConfig
from text3d.runtime.config import check as _check, load_structured
from text3d.runtime.resources import CONFIG_DIR
from text3d.export import ExportConfig, check_export_config
from text3d.guidance.sds import SDSConfig
from text3d.guidance.vsd import VSDConfig
from text3d.prompts import PromptConfig
from text3d.renderers.nerf import NeRFConfig, check_nerf_config
from text3d.teacher import TeacherConfig

GUIDANCES = ("sds", "vsd")
SHADINGS = ("albedo", "lambertian", "textureless")


@dataclass
class TrainConfig:
    """The optimisation loop (shared by SDS and VSD)."""

    steps: int = 1200
    batch_size: int = 1
    particles: int = 1  # independent assets (each its own field and background); one is drawn per step
    resolution: int = 64  # rendered image side during optimisation
    high_resolution: Optional[int] = None  # if set, the render side from `high_resolution_from` of the run on
    high_resolution_from: float = 0.5
    lr: float = 1e-2  # hash grid and MLP
    lr_background: float = 1e-3
    # shading: albedo only for the first `albedo_warmup` fraction, then drawn with these probabilities
    albedo_warmup: float = 0.1
    p_albedo: float = 0.5
    p_lambertian: float = 0.25
    p_textureless: float = 0.25
    ambient: float = 0.3
    light_jitter_deg: float = 45.0  # the light direction is the camera direction tilted by up to this
    lambda_orientation: float = 1e-2
    lambda_sparsity: float = 0.0
    lambda_opaque: float = 0.0  # weight of the opacity binary entropy (training.trainer.opacity_entropy)
    max_nonfinite_steps: int = 10  # consecutive non-finite losses before the run stops
    log_every: int = 10
    preview_every: int = 200
    checkpoint_every: int = 100
    preview_views: int = 4


STAGES = ("nerf", "geometry", "texture")


@dataclass
class MeshStageConfig:
    """A mesh stage (geometry: DMTet refinement; texture: albedo on the frozen surface)."""

    steps: int = 300
    resolution: int = 64  # render side
    lr: float = 0.005
    grid_resolution: int = 64  # geometry: DMTet cubes per side
    lambda_laplacian: float = 10.0  # geometry: uniform-Laplacian smoothness
    lambda_normal_consistency: float = 0.1  # geometry: adjacent face normals agree
    shadings: List[str] = field(default_factory=lambda: ["lambertian", "textureless"])


@dataclass
class RunConfig:
    prompt: str = ""
    guidance: str = "sds"
    seed: int = 0
    device: str = "auto"
    run_name: str = ""  # unique name of the run's exported files; set when the run starts
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    camera: CameraSamplerConfig = field(default_factory=CameraSamplerConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    nerf: NeRFConfig = field(default_factory=NeRFConfig)
    sds: SDSConfig = field(default_factory=SDSConfig)
    vsd: VSDConfig = field(default_factory=VSDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    stages: List[str] = field(default_factory=lambda: ["nerf"])  # nerf[,geometry][,texture]
    geometry: MeshStageConfig = field(default_factory=MeshStageConfig)
    texture: MeshStageConfig = field(default_factory=lambda: MeshStageConfig(
        steps=300, resolution=128, lr=0.005, lambda_laplacian=0.0, lambda_normal_consistency=0.0,
        shadings=["albedo", "lambertian"]))


def render_resolution(t: TrainConfig, step: int) -> int:
    """The render side at ``step`` (from 1): ``resolution``, then ``high_resolution`` if set."""
    if t.high_resolution and (step - 1) / max(1, t.steps) >= t.high_resolution_from:
        return t.high_resolution
    return t.resolution


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = (), base=None,
                use_default_file: bool = True) -> RunConfig:
    """Build a :class:`RunConfig` from the defaults, YAML files and ``key=value`` overrides."""
    paths = [CONFIG_DIR / "default.yaml"] if (use_default_file and base is None) else []
    run: RunConfig = load_structured(RunConfig if base is None else base, paths + list(files), overrides)
    validate(run)
    return run


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def validate(cfg: RunConfig) -> None:
    """Range checks that types alone cannot express."""
    t = cfg.train
    _check(cfg.guidance in GUIDANCES, f"guidance must be one of {', '.join(GUIDANCES)}, got {cfg.guidance!r}")
    _check(t.steps >= 1, f"train.steps must be at least 1, got {t.steps}")
    _check(t.batch_size >= 1, f"train.batch_size must be at least 1, got {t.batch_size}")
    _check(t.resolution >= 16 and t.resolution % 8 == 0,
           f"train.resolution must be a multiple of 8 and at least 16, got {t.resolution}")
    _check(t.lr > 0 and t.lr_background >= 0, "train.lr must be > 0 and train.lr_background >= 0")
    probs = (t.p_albedo, t.p_lambertian, t.p_textureless)
    _check(all(p >= 0 for p in probs) and sum(probs) > 0,
           "train.p_albedo/p_lambertian/p_textureless must be >= 0 with a positive sum")
    _check(0.0 <= t.albedo_warmup <= 1.0, f"train.albedo_warmup must be in [0, 1], got {t.albedo_warmup}")
    _check(0.0 <= t.ambient <= 1.0, f"train.ambient must be in [0, 1], got {t.ambient}")
    _check(t.lambda_opaque >= 0, f"train.lambda_opaque must be >= 0, got {t.lambda_opaque}")
    for name in ("log_every", "preview_every", "checkpoint_every", "max_nonfinite_steps", "preview_views"):
        _check(getattr(t, name) >= 1, f"train.{name} must be at least 1, got {getattr(t, name)}")
    _check(t.high_resolution is None or (t.high_resolution >= 16 and t.high_resolution % 8 == 0),
           f"train.high_resolution must be null or a multiple of 8 and at least 16, got {t.high_resolution}")
    _check(0.0 <= t.high_resolution_from <= 1.0, "train.high_resolution_from must be in [0, 1]")
    _check(t.particles >= 1, f"train.particles must be at least 1, got {t.particles}")
    for name in ("sds", "vsd"):
        _check_guidance(getattr(cfg, name), name)
    _check(len(cfg.stages) >= 1 and all(s in STAGES for s in cfg.stages) and len(set(cfg.stages)) == len(cfg.stages)
           and list(cfg.stages) == [s for s in STAGES if s in cfg.stages],
           f"stages must be an ordered subset of {', '.join(STAGES)}, got {list(cfg.stages)}")
    for name in ("geometry", "texture"):
        m = getattr(cfg, name)
        _check(m.steps >= 1 and m.lr > 0 and m.resolution >= 16 and m.resolution % 8 == 0 and m.grid_resolution >= 4,
               f"{name}.steps/lr/resolution/grid_resolution out of range")
        _check(len(m.shadings) >= 1 and all(x in SHADINGS for x in m.shadings),
               f"{name}.shadings must be among {', '.join(SHADINGS)}")
    v = cfg.vsd
    _check(v.lora_rank >= 1 and v.lora_alpha > 0, "vsd.lora_rank must be >= 1 and vsd.lora_alpha > 0")
    _check(v.lora_lr > 0 and v.lora_steps >= 0, "vsd.lora_lr must be > 0 and vsd.lora_steps >= 0")
    _check(0.0 <= v.lora_t_min < v.lora_t_max <= 1.0, "need 0 <= vsd.lora_t_min < vsd.lora_t_max <= 1")
    _check(0.0 <= v.camera_drop <= 1.0 and v.camera_hidden >= 1,
           "vsd.camera_drop must be in [0, 1] and vsd.camera_hidden >= 1")
    for name in ("radius", "elevation", "azimuth", "fovy"):
        lo, hi = getattr(cfg.camera, name)
        _check(lo <= hi, f"camera.{name} must be a [low, high] pair with low <= high, got [{lo}, {hi}]")
    _check(cfg.camera.radius[0] > 0, "camera.radius must be positive")
    _check(0 < cfg.camera.fovy[0] and cfg.camera.fovy[1] < 180, "camera.fovy must be in (0, 180) degrees")
    check_nerf_config(cfg.nerf)
    check_export_config(cfg.export)


def _check_guidance(s: SDSConfig, name: str) -> None:
    """The timestep-schedule, CFG and clipping fields that SDS and VSD share."""
    _check(0.0 <= s.t_min < s.t_max <= 1.0, f"need 0 <= {name}.t_min < {name}.t_max <= 1, got {s.t_min}, {s.t_max}")
    _check(s.guidance_scale >= 0, f"{name}.guidance_scale must be >= 0, got {s.guidance_scale}")
    _check(s.t_anneal in ("none", "linear", "sqrt", "cosine"),
           f"{name}.t_anneal must be none, linear, sqrt or cosine, got {s.t_anneal!r}")
    if s.t_anneal != "none" and s.t_max_end is not None:
        _check(s.t_min <= s.t_max_end <= s.t_max, f"need {name}.t_min <= {name}.t_max_end <= {name}.t_max")
    _check(s.grad_clip is None or s.grad_clip > 0, f"{name}.grad_clip must be > 0 or null")
    _check(s.space in ("latent", "image"), f"{name}.space must be latent or image, got {s.space!r}")
    _check(s.image_weight > 0, f"{name}.image_weight must be > 0, got {s.image_weight}")
    _check(s.perp_neg >= 0, f"{name}.perp_neg must be >= 0, got {s.perp_neg}")
