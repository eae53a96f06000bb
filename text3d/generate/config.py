"""The one config system: typed dataclasses, defaults from YAML in ``text3d/configs/``, overrides as ``key=value``.

Each layer owns its dataclass (``NeRFConfig`` in renderers, ``SDSConfig`` in guidance, ...);
:class:`RunConfig` composes them. Loading order: dataclass defaults < ``text3d/configs/default.yaml``
< ``--config FILE`` < CLI flags < ``key=value`` overrides. Unknown keys and values of the wrong
type or range raise :class:`~text3d.errors.ConfigError` with one line naming the key.

Guidance methods and stages come from registries filled by Python entry points
(:mod:`text3d.runtime.registry`; groups ``text3d.guidance`` and ``text3d.stages``), text3d's own (``sds``,
``vsd``; ``nerf``, ``geometry``, ``texture``, in :mod:`text3d.generate.builtins`) exactly like a plug-in's.
The config of a registered method lives under its name: the schema every run is loaded into,
:func:`run_config_schema`, is :class:`RunConfig` (what every run has) plus one section per registered
guidance and per stage that has a config, so ``sds.guidance_scale=50``, ``geometry.steps=100`` and a
plug-in's ``my_sds.extra=2`` are all ordinary keys: typed, validated, in ``config.yaml``, and resumable.
The schema is built on first use, never at import, so importing this module loads no plug-in.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Protocol, Sequence

from omegaconf import OmegaConf

from text3d.cameras import CameraSamplerConfig
from text3d.runtime.config import check as _check, load_structured
from text3d.runtime.resources import CONFIG_DIR
from text3d.export import ExportConfig, check_export_config
from text3d.prompts import PromptConfig
from text3d.renderers.nerf import NeRFConfig, check_nerf_config
from text3d.runtime.registry import (GUIDANCE_GROUP, STAGES_GROUP, Entry, Registry, loadable, preset_path,
                                     with_sections)
from text3d.teacher import TeacherConfig

if TYPE_CHECKING:
    import torch

    from text3d.guidance import GuidanceOutput
    from text3d.renderers.protocol import Renderer

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
    # learning-rate decay (lr_factor): from `lr_decay_start` of the run on, every group's rate falls geometrically to
    # `lr_end / lr` of itself at the end (None: constant)
    lr_end: Optional[float] = None
    lr_decay_start: float = 0.5
    lr_background: float = 1e-3
    # shading: albedo only for the first `albedo_warmup` fraction, then drawn with these probabilities
    albedo_warmup: float = 0.1
    # progressive views (DreamCraft3D's progressive view training): over the first `view_warmup` fraction of the run
    # the azimuth range opens from `view_warmup_azimuth` degrees either side of its middle (the front) to the whole
    # of camera.azimuth (training_cameras)
    view_warmup: float = 0.0
    view_warmup_azimuth: float = 30.0
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


@dataclass
class MeshStageConfig:
    """A mesh stage (geometry: DMTet refinement; texture: albedo on the frozen surface)."""

    steps: int = 300
    resolution: int = 64  # render side
    batch_size: Optional[int] = None  # views a step (None: train.batch_size)
    lr: float = 0.005
    grid_resolution: int = 64  # geometry: DMTet cubes per side
    lambda_laplacian: float = 10.0  # geometry: uniform-Laplacian smoothness
    lambda_normal_consistency: float = 0.1  # geometry: adjacent face normals agree
    shadings: List[str] = field(default_factory=lambda: ["lambertian", "textureless"])
    # a front view drawn by the teacher, pinned by a squared error (text3d.generate.reference; 0 = off): its weight,
    # the camera's elevation (azimuth 0, camera.eval_radius and eval_fovy), the jitter of that camera each step
    # (degrees), and the DDIM steps and CFG of the teacher's sample; with reference_negative_back, CFG's
    # unconditional branch is the prompt's opposite view (the front pushed away from the back: a car's lights drawn)
    reference_weight: float = 0.0
    reference_elevation: float = 0.0
    reference_jitter: float = 4.0
    reference_steps: int = 30
    reference_guidance_scale: float = 5.0
    reference_negative_back: bool = False
    reference_back: bool = False  # the teacher's back view pinned too (its CFG pushed away from the front view)


@dataclass
class RunConfig:
    """What every run has. A loaded run config is an instance of :func:`run_config_schema`, this class plus a
    section per registered guidance (``sds``, ``vsd``, ...) and stage with a config (``geometry``, ``texture``)."""

    prompt: str = ""
    guidance: str = "sds"
    seed: int = 0
    device: str = "auto"
    run_name: str = ""  # unique name of the run's exported files; set when the run starts
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    camera: CameraSamplerConfig = field(default_factory=CameraSamplerConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    nerf: NeRFConfig = field(default_factory=NeRFConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    stages: List[str] = field(default_factory=lambda: ["nerf"])  # nerf[,geometry][,texture]


# ------------------------------------------------------------------------------------ registered methods
class Guidance(Protocol):
    """What the 3D loop calls on a guidance (:class:`text3d.guidance.SDSGuidance`'s interface)."""

    def __call__(self, images: "torch.Tensor", prompts: Sequence[str], progress: float = 0.0,
                 cameras: Any = None) -> "GuidanceOutput": ...

    def update(self, output: "GuidanceOutput", prompts: Sequence[str], cameras: Any = None) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class GuidanceBuilder(Protocol):
    def __call__(self, teacher: Any, cfg: Any, negative_prompt: str = "") -> Guidance: ...


class StageBuilder(Protocol):
    def __call__(self, cfg: RunConfig, device: "torch.device",
                 sources: "list[Renderer] | None") -> "list[Renderer]": ...


@dataclass(frozen=True, kw_only=True)
class GuidanceMethod(Entry):
    """A guidance method (entry-point group ``text3d.guidance``), selected by ``guidance: NAME``.

    ``build(teacher, section, negative_prompt=...)`` makes the guidance from the run's section ``NAME`` (an
    instance of ``config``); ``preset``: a YAML file that ``--guidance NAME`` merges over the defaults (unless
    ``--config`` is given); ``validate(section, NAME)``: range checks raising ConfigError.
    """

    build: GuidanceBuilder
    preset: str | os.PathLike | None = None
    validate: Callable[[Any, str], None] | None = None

    @property
    def preset_path(self) -> Path | None:
        return preset_path(self.preset)


@dataclass(frozen=True, kw_only=True)
class StageKind(Entry):
    """A stage of ``text3d generate`` (entry-point group ``text3d.stages``), run when ``stages`` names it.

    ``order``: where it runs among the stages (nerf 0, geometry 10, texture 20); ``build(cfg, device,
    sources)``: its particles (:class:`~text3d.renderers.protocol.Renderer`), from the previous stage's
    (``sources``, None for a first stage); ``train_config(cfg)``: its loop settings; ``regularisers``: render
    keys it adds to the loss -> the field of its section that weights each; ``checkpoint``: its checkpoint in
    the run folder (default ``checkpoints/NAME.pt``); ``validate(section, NAME)``: range checks; ``config``:
    its section (None: the stage uses ``nerf`` and ``train``); ``continues``: True when ``build`` needs an
    earlier stage's particles, so that a run starting with this stage needs ``--from RUN_DIR`` (checked
    before anything is loaded or written). Its particles draw their shading from ``train``'s probabilities
    (the ``nerf`` stage) or from the section's ``shadings`` list.
    """

    build: StageBuilder
    order: int
    train_config: Callable[[RunConfig], TrainConfig]
    regularisers: Mapping[str, str] = field(default_factory=dict)
    checkpoint: str | os.PathLike | None = None
    validate: Callable[[Any, str], None] | None = None
    continues: bool = False

    @property
    def checkpoint_path(self) -> Path:
        """Relative to the run folder."""
        return Path(self.checkpoint) if self.checkpoint is not None else Path("checkpoints") / f"{self.name}.pt"


GUIDANCE_REGISTRY: Registry[GuidanceMethod] = Registry(GUIDANCE_GROUP, "guidance", GuidanceMethod)
STAGE_REGISTRY: Registry[StageKind] = Registry(STAGES_GROUP, "stage", StageKind)


def stage_order() -> tuple[str, ...]:
    """The registered stages in the order they run (nerf, geometry, texture for the built-in ones)."""
    entries = loadable(STAGE_REGISTRY)
    return tuple(sorted(entries, key=lambda name: (entries[name].order, name)))


def stage_checkpoint(stage: str) -> Path:
    """The checkpoint of ``stage``, relative to the run folder (``checkpoints/last.pt`` for the NeRF)."""
    return STAGE_REGISTRY.get(stage).checkpoint_path


@functools.lru_cache(maxsize=None)
def run_config_schema() -> type:
    """:class:`RunConfig` plus one section per registered guidance (by name) and per registered stage that has
    a config (in stage order), built once per process from the registries.

    Why one schema with every registered section rather than only the selected method's: a key such as
    ``vsd.lora.rank=8`` stays valid whatever ``guidance`` says (as it always was), ``--guidance`` can switch
    method on a loaded config, and the snapshot in ``config.yaml`` lists every setting a run could use.
    """
    guidances = loadable(GUIDANCE_REGISTRY)
    stages = loadable(STAGE_REGISTRY)
    named = [("guidance", name, guidances[name]) for name in sorted(guidances)]
    named += [("stage", name, stages[name]) for name in stage_order()]
    return with_sections(RunConfig, named, "run config")


def guidance_preset(name: str) -> Path | None:
    """The preset YAML that ``--guidance NAME`` loads (None: the defaults alone); one-line error for an unknown
    name listing the registered ones."""
    return GUIDANCE_REGISTRY.get(name).preset_path


def check_mesh_stage_config(m: MeshStageConfig, name: str) -> None:
    """Range checks of a mesh stage's section."""
    _check(m.batch_size is None or m.batch_size >= 1, f"{name}.batch_size must be >= 1 (or null: train.batch_size)")
    _check(m.steps >= 1 and m.lr > 0 and m.resolution >= 16 and m.resolution % 8 == 0 and m.grid_resolution >= 4,
           f"{name}.steps/lr/resolution/grid_resolution out of range")
    _check(len(m.shadings) >= 1 and all(x in SHADINGS for x in m.shadings),
           f"{name}.shadings must be among {', '.join(SHADINGS)}")
    _check(m.reference_weight >= 0 and m.reference_jitter >= 0 and m.reference_steps >= 1
           and m.reference_guidance_scale >= 1 and -90 < m.reference_elevation < 90,
           f"{name}.reference_weight and reference_jitter must be >= 0, reference_steps >= 1, "
           f"reference_guidance_scale >= 1 and reference_elevation in (-90, 90)")


def run_progress(t: TrainConfig, step: int) -> float:
    """The fraction of the run done before ``step`` (from 1): 0 at the first step, what every schedule reads."""
    return (step - 1) / max(1, t.steps)


def lr_factor(t: TrainConfig, step: int) -> float:
    """The factor on every parameter group's learning rate at ``step`` (from 1): 1 until ``lr_decay_start`` of the
    run, then ``(lr_end / lr) ** f`` at the fraction ``f`` of the decay's span done, reaching ``lr_end`` at the end of
    the run (geometric, as Adam's step is proportional to the rate). The hash grid's Adam steps are about the rate
    whatever the gradient's size, so with SDS's noisy gradient a constant rate keeps the fine features moving: an
    asset fitted to the world's own renders loses its car's lights and wheels in 300 SDS steps at 1e-2, not at
    1e-3 (docs/guidance.md, 2026-12-07, session 26)."""
    if t.lr_end is None:
        return 1.0
    span = max(1e-9, 1.0 - t.lr_decay_start)
    done = min(1.0, max(0.0, (run_progress(t, step) - t.lr_decay_start) / span))
    return (t.lr_end / t.lr) ** done


def render_resolution(t: TrainConfig, step: int) -> int:
    """The render side at ``step`` (from 1): ``resolution``, then ``high_resolution`` if set."""
    if t.high_resolution and run_progress(t, step) >= t.high_resolution_from:
        return t.high_resolution
    return t.resolution


def training_cameras(camera: CameraSamplerConfig, t: TrainConfig, step: int) -> CameraSamplerConfig:
    """The camera ranges to draw from at ``step`` (from 1). With ``view_warmup = w > 0`` the azimuth range
    ``[m - h, m + h]`` about the middle ``m`` of ``camera.azimuth = [m - H, m + H]`` has the half-width
    ``h = h0 + (H - h0) min(1, p / w)`` at the run's fraction ``p = (step - 1) / steps``, ``h0`` being
    ``view_warmup_azimuth`` (at most ``H``): the front first, where the teacher draws what marks it, then the rest."""
    if t.view_warmup <= 0:
        return camera
    lo, hi = camera.azimuth
    middle, full = (lo + hi) / 2, (hi - lo) / 2
    start = min(full, t.view_warmup_azimuth)
    half = start + (full - start) * min(1.0, run_progress(t, step) / t.view_warmup)
    return replace(camera, azimuth=(middle - half, middle + half))


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = (), base=None,
                use_default_file: bool = True) -> RunConfig:
    """Build a :class:`RunConfig` from the defaults, YAML files and ``key=value`` overrides."""
    paths = [CONFIG_DIR / "default.yaml"] if (use_default_file and base is None) else []
    run: RunConfig = load_structured(run_config_schema() if base is None else base, paths + list(files), overrides)
    validate(run)
    return run


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def validate(cfg: RunConfig) -> None:
    """Range checks that types alone cannot express."""
    t = cfg.train
    if cfg.guidance not in GUIDANCE_REGISTRY:
        raise GUIDANCE_REGISTRY.unknown(cfg.guidance)
    GUIDANCE_REGISTRY.get(cfg.guidance)  # a plug-in that fails to load says so here, before anything is made
    _check(t.steps >= 1, f"train.steps must be at least 1, got {t.steps}")
    _check(t.batch_size >= 1, f"train.batch_size must be at least 1, got {t.batch_size}")
    _check(t.resolution >= 16 and t.resolution % 8 == 0,
           f"train.resolution must be a multiple of 8 and at least 16, got {t.resolution}")
    _check(t.lr > 0 and t.lr_background >= 0, "train.lr must be > 0 and train.lr_background >= 0")
    probs = (t.p_albedo, t.p_lambertian, t.p_textureless)
    _check(all(p >= 0 for p in probs) and sum(probs) > 0,
           "train.p_albedo/p_lambertian/p_textureless must be >= 0 with a positive sum")
    _check(0.0 <= t.albedo_warmup <= 1.0, f"train.albedo_warmup must be in [0, 1], got {t.albedo_warmup}")
    _check(0.0 <= t.view_warmup <= 1.0 and t.view_warmup_azimuth >= 0,
           f"train.view_warmup must be in [0, 1] and train.view_warmup_azimuth >= 0, got {t.view_warmup} and "
           f"{t.view_warmup_azimuth}")
    _check(0.0 <= t.ambient <= 1.0, f"train.ambient must be in [0, 1], got {t.ambient}")
    _check(t.lambda_opaque >= 0, f"train.lambda_opaque must be >= 0, got {t.lambda_opaque}")
    _check(t.lr_end is None or t.lr_end > 0, f"train.lr_end must be > 0 (or null), got {t.lr_end}")
    _check(0.0 <= t.lr_decay_start < 1.0, f"train.lr_decay_start must be in [0, 1), got {t.lr_decay_start}")
    for name in ("log_every", "preview_every", "checkpoint_every", "max_nonfinite_steps", "preview_views"):
        _check(getattr(t, name) >= 1, f"train.{name} must be at least 1, got {getattr(t, name)}")
    _check(t.high_resolution is None or (t.high_resolution >= 16 and t.high_resolution % 8 == 0),
           f"train.high_resolution must be null or a multiple of 8 and at least 16, got {t.high_resolution}")
    _check(0.0 <= t.high_resolution_from <= 1.0, "train.high_resolution_from must be in [0, 1]")
    _check(t.particles >= 1, f"train.particles must be at least 1, got {t.particles}")
    for name, method in loadable(GUIDANCE_REGISTRY).items():
        if method.validate is not None and hasattr(cfg, name):
            method.validate(getattr(cfg, name), name)
    for name in cfg.stages:
        if name in STAGE_REGISTRY:
            STAGE_REGISTRY.get(name)  # a stage plug-in that fails to load says so here
    order = stage_order()
    _check(len(cfg.stages) >= 1 and all(s in order for s in cfg.stages) and len(set(cfg.stages)) == len(cfg.stages)
           and list(cfg.stages) == [s for s in order if s in cfg.stages],
           f"stages must be an ordered subset of {', '.join(order)}, got {list(cfg.stages)}")
    for name in order:
        kind = STAGE_REGISTRY.get(name)
        if kind.validate is not None and hasattr(cfg, name):
            kind.validate(getattr(cfg, name), name)
    for name in ("radius", "elevation", "azimuth", "fovy"):
        lo, hi = getattr(cfg.camera, name)
        _check(lo <= hi, f"camera.{name} must be a [low, high] pair with low <= high, got [{lo}, {hi}]")
    _check(cfg.camera.radius[0] > 0, "camera.radius must be positive")
    _check(0 < cfg.camera.fovy[0] and cfg.camera.fovy[1] < 180, "camera.fovy must be in (0, 180) degrees")
    check_nerf_config(cfg.nerf)
    check_export_config(cfg.export)
