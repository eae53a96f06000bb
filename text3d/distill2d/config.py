"""Typed configuration of `text3d distill2d`; presets per method live in ``text3d/configs/distill2d/``.

Methods come from the registry :data:`DISTILL2D_REGISTRY`, filled by the Python entry points of group
``text3d.distill2d`` (:mod:`text3d.runtime.registry`): text3d's six (:mod:`text3d.distill2d.builtins`) exactly
like a plug-in's. A method's entry names its trainer, the function that runs it and its preset YAML; a method
with a config dataclass of its own gets a section under its name in :func:`distill_config_schema`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

from text3d.runtime.config import check as _check, load_structured
from text3d.runtime.registry import DISTILL2D_GROUP, Entry, Registry, loadable, preset_path, with_sections
from text3d.guidance.core import ScoreConfig, check_score_config
from text3d.guidance.lora import LoRAScoreConfig, check_lora_config

DEFAULT_STEPS = 300  # student updates of a run whose `steps` is None (PD and guided: their phases' own)
MIN_AUTO_PAIRS = 32  # the fewest regression pairs of regression.pairs=None


@dataclass
class RegressionConfig:
    """DMD's regression on (noise, teacher sample) pairs made once by the teacher's DDIM sampler; KD's
    training data are the same pairs."""

    weight: float = 0.0  # 0 = off; DMD uses 0.25
    metric: str = "latent_l2"  # latent_l2 | lpips (needs the `lpips` package and its weights)
    # how many pairs; None = as many as the run can draw, within bounds: min(max_pairs, max(MIN_AUTO_PAIRS,
    # batch_size * steps)), fixed when the config is loaded (a 3-step smoke run makes a few dozen, not 1024)
    pairs: Optional[int] = None
    max_pairs: int = 256  # the most pairs of pairs=None (the presets: DMD 256, KD 1024)
    sampler_steps: int = 50
    guidance_scale: float = 4.5
    batch_size: int = 4


@dataclass
class GANConfig:
    """DMD2's GAN: a classifier head on the fake-score UNet's bottleneck."""

    generator_weight: float = 0.0  # 0 = off; DMD2 uses 1e-3
    discriminator_weight: float = 1e-2
    lr: float = 1e-3


@dataclass
class TrajectoryConfig:
    """Knowledge (KD), progressive (PD) and guided (w-conditioned) distillation (:mod:`.trajectory`).

    ``round_steps`` and ``stage1_steps`` are the phases' updates while ``steps`` is not set; a set ``steps``
    (``--steps``) is the total, split over the phases in proportion to them (``trajectory.plan``)."""

    loss: str = "l2"  # KD's regression loss: l2 | l1
    start_steps: int = 64  # PD: the teacher's DDIM steps in the first round (a power of two)
    end_steps: int = 1  # PD: the student's steps after the last round
    round_steps: int = 200  # student updates per PD round (the share of each round when `steps` is set)
    guidance_scale: float = 4.5  # CFG of the original teacher in PD's first round
    w_min: float = 1.0  # guided: guidance scales drawn from [w_min, w_max] (diffusers' s, 1 = no guidance)
    w_max: float = 8.0
    w_embed_dim: int = 32  # guided: size of the guidance embedding (UNet time_cond_proj_dim)
    stage1_steps: int = 300  # guided: steps of stage 1 (matching the teacher's CFG output for each w); its share
    # of `steps` when that is set


@dataclass
class Distill2DConfig:
    method: str = "swiftbrush"
    seed: int = 0
    device: str = "auto"
    mixed_precision: str = "auto"  # auto = bf16 on CUDA, off on CPU | no | fp16 | bf16
    teacher: Optional[str] = None  # None = the embedded teacher
    prompts_file: Optional[str] = None  # None = the embedded world's captions
    negative_prompt: str = ""
    real_data: Optional[str] = None  # real images (DMD2's GAN, PD and guided distillation): a toyworld dataset
    real_images: int = 1024  # folder or an image folder; without one, this many embedded-world renders are made
    # student updates in all, for every method (--steps); None = the method's own count: DEFAULT_STEPS for the
    # score methods and KD (the presets set theirs), the phases' trajectory.round_steps and stage1_steps for PD
    # and guided. For PD and guided a set value is split over the rounds (and stage 1) in proportion to those.
    steps: Optional[int] = None
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    timesteps: List[int] = field(default_factory=lambda: [999])  # student's conditioning timesteps, descending
    backward_simulation: bool = True  # multi-step students: train step k on inputs the student made itself
    ema_decay: float = 0.0  # 0 = no EMA; else the EMA weights are the saved student
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"  # the student's optimiser: adamw | adafactor (no first moment, factored second moment)
    # memory-lean mode for Stable-Diffusion-sized teachers on the CPU (apply_lean): auto = on when the device is the
    # CPU and the teacher's images are 256 px or larger | on | off
    lean: str = "auto"
    sample_every: int = 100
    checkpoint_every: int = 50
    log_every: int = 10
    max_nonfinite_steps: int = 10  # consecutive steps with a NaN/inf loss before the run stops
    # the score-distillation core (text3d.guidance.core) and the fake score (a LoRA, text3d.guidance.lora)
    core: ScoreConfig = field(default_factory=lambda: ScoreConfig(guidance_scale=4.5, lora_guidance_scale=4.5,
                                                                   reduction="mean"))
    fake: LoRAScoreConfig = field(default_factory=lambda: LoRAScoreConfig(lr=1e-3, null_prompt_prob=0.1,
                                                                          alpha_weighted=True))
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)


@dataclass(frozen=True, kw_only=True)
class Distill2DMethod(Entry):
    """A 2D distillation method (entry-point group ``text3d.distill2d``), selected by ``--method NAME``.

    ``build(cfg, out, teacher=None, show_progress=True)``: its trainer (``Distill2DTrainer`` for the score
    methods, ``TrajectoryTrainer`` for the trajectory ones), with ``load()`` for a resumed run;
    ``run(trainer, evaluate)``: trains it and returns a :class:`~text3d.distill2d.results.DistillResult`;
    ``preset``: the YAML merged first (``text3d/configs/distill2d/NAME.yaml`` for text3d's own);
    ``validate(cfg)``: range checks of its settings; ``config``: its own section under ``NAME`` (None: it
    uses the shared sections ``core``, ``fake``, ``regression``, ``gan``, ``trajectory``).
    """

    run: Callable[[Any, bool], Any]
    preset: str | os.PathLike | None = None
    validate: Callable[[Distill2DConfig], None] | None = None

    @property
    def preset_path(self) -> Path | None:
        return preset_path(self.preset)


DISTILL2D_REGISTRY: Registry[Distill2DMethod] = Registry(DISTILL2D_GROUP, "--method", Distill2DMethod)


@functools.lru_cache(maxsize=None)
def distill_config_schema() -> type:
    """:class:`Distill2DConfig` plus a section per registered method that has a config (none of text3d's own)."""
    methods = loadable(DISTILL2D_REGISTRY)
    return with_sections(Distill2DConfig, [("distill2d", name, methods[name]) for name in sorted(methods)],
                         "distill2d config")


def method_preset(method: str) -> Path | None:
    """The preset YAML of a registered method (one-line error for an unknown one)."""
    return DISTILL2D_REGISTRY.get(method).preset_path


def load_distill_config(method: str, files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Distill2DConfig:
    """The method's preset, then ``files``, then ``key=value`` overrides; validated."""
    if method not in DISTILL2D_REGISTRY:
        raise DISTILL2D_REGISTRY.unknown(method)
    preset = method_preset(method)
    cfg: Distill2DConfig = load_structured(distill_config_schema(), [*([preset] if preset else []), *files],
                                           overrides)
    cfg.method = method
    resolve_regression_pairs(cfg)
    validate(cfg)
    return cfg


def total_steps(cfg: Distill2DConfig) -> int:
    """A run's student updates when they are not split over phases: ``steps``, else :data:`DEFAULT_STEPS`."""
    return DEFAULT_STEPS if cfg.steps is None else cfg.steps


def resolve_regression_pairs(cfg: Distill2DConfig) -> None:
    """Fix ``regression.pairs=None`` (auto) to ``min(max_pairs, max(MIN_AUTO_PAIRS, batch_size * steps))``: no more
    pairs than the run's batches can draw, within bounds. A set value stays; so the saved config, and a resumed
    run, hold the number used."""
    r = cfg.regression
    if r.pairs is None:
        r.pairs = min(r.max_pairs, max(MIN_AUTO_PAIRS, cfg.batch_size * total_steps(cfg)))


LEAN_MIN_IMAGE_SIZE = 256  # lean=auto: teachers whose images are at least this large, on the CPU
LEAN_REAL_IMAGES = 8  # lean: the most real images of DMD2's GAN
LEAN_PREVIEW_PROMPTS = 2


def lean_wanted(cfg: Distill2DConfig, device_type: str, image_size: int) -> bool:
    """Whether the memory-lean mode applies: ``lean=on``, or ``auto`` on the CPU with an SD-sized teacher."""
    lean = {"true": "on", "false": "off"}.get(str(cfg.lean).lower(), str(cfg.lean))
    if lean == "auto":
        return device_type == "cpu" and image_size >= LEAN_MIN_IMAGE_SIZE
    return lean == "on"


def apply_lean(cfg: Distill2DConfig) -> list[str]:
    """The memory-lean mode, for a 512 px teacher of 860 M UNet parameters on a 24 GB CPU machine: returns the
    settings it changed, as ``key=value``. What it changes (besides the teacher's VAE encoding and decoding one
    image at a time):

    * ``optimizer=adafactor``: the student's AdamW keeps two fp32 moments per weight (2 x 3.4 GB for SD's UNet);
      Adafactor keeps a factored second moment (a row and a column vector per matrix) and no momentum, so the
      update is ``lr * g / sqrt(v_row v_col / mean(v_row))`` without momentum: noisier early steps;
    * ``gradient_checkpointing=true``: the student UNet's activations are recomputed in the backward pass (one
      more student forward per step) instead of being kept;
    * ``batch_size=1``: one prompt per student step (the gradient is noisier);
    * ``real_images`` at most 8: DMD2's GAN sees 8 real images instead of 1024 (each made at 512 px and encoded);
    * previews show 2 prompts instead of 8, and the judge's scoring of the student is skipped (216 samples at
      512 px; the judge scores the embedded world anyway).

    The student is still a full fp32 copy of the UNet, with its gradients (2 x 3.4 GB at SD size)."""
    wanted = {"optimizer": "adafactor", "gradient_checkpointing": True, "batch_size": 1,
              "real_images": min(cfg.real_images, LEAN_REAL_IMAGES)}
    changed = []
    for key, value in wanted.items():
        if getattr(cfg, key) != value:
            setattr(cfg, key, value)
            changed.append(f"{key}={value}")
    return changed


def validate(cfg: Distill2DConfig) -> None:
    _check((cfg.steps is None or cfg.steps >= 1) and cfg.batch_size >= 1, "steps and batch_size must be at least 1")
    _check(cfg.lr > 0 and cfg.fake.lr > 0, "lr and fake.lr must be > 0")
    ts = list(cfg.timesteps)
    _check(len(ts) >= 1 and all(0 <= t <= 999 for t in ts) and ts == sorted(ts, reverse=True) and len(set(ts)) == len(ts),
           f"timesteps must be distinct, descending and in [0, 999], got {ts}")
    check_score_config(cfg.core, "core")
    check_lora_config(cfg.fake, "fake")
    _check(cfg.fake.steps >= 1, "fake.steps must be >= 1")
    r = cfg.regression
    _check(r.weight >= 0 and (r.pairs is None or r.pairs >= 1) and r.max_pairs >= 1 and r.sampler_steps >= 1
           and r.batch_size >= 1,
           "regression.weight must be >= 0 and regression.pairs/max_pairs/sampler_steps/batch_size >= 1")
    _check(r.metric in ("latent_l2", "lpips"), f"regression.metric must be latent_l2 or lpips, got {r.metric!r}")
    g = cfg.gan
    _check(g.generator_weight >= 0 and g.discriminator_weight >= 0 and g.lr > 0, "gan weights must be >= 0 and gan.lr > 0")
    _check(cfg.real_images >= 1, f"real_images must be at least 1, got {cfg.real_images}")
    _check(0.0 <= cfg.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    _check(cfg.mixed_precision in ("auto", "no", "fp16", "bf16"), "mixed_precision must be auto, no, fp16 or bf16")
    _check(cfg.optimizer in ("adamw", "adafactor"), f"optimizer must be adamw or adafactor, got {cfg.optimizer!r}")
    cfg.lean = {"true": "on", "false": "off"}.get(str(cfg.lean).lower(), str(cfg.lean))  # YAML reads on/off as bools
    _check(cfg.lean in ("auto", "on", "off"), f"lean must be auto, on or off, got {cfg.lean!r}")
    j = cfg.trajectory
    _check(j.loss in ("l2", "l1"), f"trajectory.loss must be l2 or l1, got {j.loss!r}")
    power = j.start_steps >= 2 and (j.start_steps & (j.start_steps - 1)) == 0
    _check(power and 1 <= j.end_steps < j.start_steps and (j.end_steps & (j.end_steps - 1)) == 0,
           f"trajectory.start_steps and end_steps must be powers of two with start > end >= 1, got "
           f"{j.start_steps} and {j.end_steps}")
    _check(j.round_steps >= 1 and j.stage1_steps >= 0, "trajectory.round_steps must be >= 1, stage1_steps >= 0")
    _check(1.0 <= j.w_min <= j.w_max, f"need 1 <= trajectory.w_min <= trajectory.w_max, got {j.w_min}, {j.w_max}")
    _check(j.w_embed_dim >= 2 and j.w_embed_dim % 2 == 0, "trajectory.w_embed_dim must be even and >= 2")
    for name in ("sample_every", "checkpoint_every", "log_every", "max_nonfinite_steps"):
        _check(getattr(cfg, name) >= 1, f"{name} must be at least 1")
    if cfg.method not in DISTILL2D_REGISTRY:
        raise DISTILL2D_REGISTRY.unknown(cfg.method)
    method = DISTILL2D_REGISTRY.get(cfg.method)  # a plug-in that fails to load says so here
    if method.validate is not None:
        method.validate(cfg)
