"""Typed configuration of `text3d distill2d`; presets per method live in ``text3d/configs/distill2d/``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from text3d.runtime.config import check as _check, load_structured
from text3d.runtime.resources import CONFIG_DIR
from text3d.errors import ConfigError

METHODS = ("swiftbrush", "dmd", "dmd2", "kd", "pd", "guided")
SCORE_METHODS = ("swiftbrush", "dmd", "dmd2")  # trained by the score-difference trainer; the rest by trajectory.py
WEIGHTINGS = ("sigma2", "dmd")


@dataclass
class ScoreCoreConfig:
    """The score-difference gradient every method shares (see :mod:`text3d.distill2d.score_core`)."""

    real_guidance_scale: float = 4.5  # CFG of the frozen teacher ("real score")
    fake_guidance_scale: float = 4.5  # CFG of the LoRA ("fake score"); 1 = conditional only
    weighting: str = "sigma2"  # sigma2: (1 - ab_t)(eps_real - eps_fake); dmd: (x0_fake - x0_real) / mean|x - x0_real|
    t_min: float = 0.02
    t_max: float = 0.98
    reduction: str = "mean"  # mean (the gradient divided by the element count) | sum (exactly the gradient)
    grad_clip: Optional[float] = None
    space: str = "latent"  # latent | image: CFG on the decoded x0s, gradient on the decoded student image


@dataclass
class FakeScoreConfig:
    """The LoRA on the teacher's UNet that models the student's distribution."""

    rank: int = 4
    alpha: Optional[float] = None  # None = rank (scale 1)
    lr: float = 1e-3
    steps_per_student_step: int = 1  # DMD2's two time-scale update rule uses 5
    t_min: float = 0.0
    t_max: float = 1.0
    null_prompt_prob: float = 0.1  # SwiftBrush trains the LoRA on 10% empty prompts
    alpha_weighted: bool = True  # weight the eps-MSE by alpha_bar_t (SwiftBrush); False = plain eps-MSE (DMD)


@dataclass
class RegressionConfig:
    """DMD's regression on (noise, teacher sample) pairs made once by the teacher's DDIM sampler."""

    weight: float = 0.0  # 0 = off; DMD uses 0.25
    metric: str = "latent_l2"  # latent_l2 | lpips (needs the `lpips` package and its weights)
    pairs: int = 256
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
    """Knowledge (KD), progressive (PD) and guided (w-conditioned) distillation (:mod:`.trajectory`)."""

    loss: str = "l2"  # KD's regression loss: l2 | l1
    start_steps: int = 64  # PD: the teacher's DDIM steps in the first round (a power of two)
    end_steps: int = 1  # PD: the student's steps after the last round
    round_steps: int = 200  # student updates per PD round
    guidance_scale: float = 4.5  # CFG of the original teacher in PD's first round
    w_min: float = 1.0  # guided: guidance scales drawn from [w_min, w_max] (diffusers' s, 1 = no guidance)
    w_max: float = 8.0
    w_embed_dim: int = 32  # guided: size of the guidance embedding (UNet time_cond_proj_dim)
    stage1_steps: int = 300  # guided: steps of stage 1 (matching the teacher's CFG output for each w)


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
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    timesteps: List[int] = field(default_factory=lambda: [999])  # student's conditioning timesteps, descending
    backward_simulation: bool = True  # multi-step students: train step k on inputs the student made itself
    ema_decay: float = 0.0  # 0 = no EMA; else the EMA weights are the saved student
    gradient_checkpointing: bool = False
    sample_every: int = 100
    checkpoint_every: int = 50
    log_every: int = 10
    core: ScoreCoreConfig = field(default_factory=ScoreCoreConfig)
    fake: FakeScoreConfig = field(default_factory=FakeScoreConfig)
    regression: RegressionConfig = field(default_factory=RegressionConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)


def method_preset(method: str) -> Path:
    return CONFIG_DIR / "distill2d" / f"{method}.yaml"


def load_distill_config(method: str, files: Sequence[str | Path] = (), overrides: Sequence[str] = ()) -> Distill2DConfig:
    """The method's preset, then ``files``, then ``key=value`` overrides; validated."""
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    cfg: Distill2DConfig = load_structured(Distill2DConfig, [method_preset(method), *files], overrides)
    cfg.method = method
    validate(cfg)
    return cfg


def validate(cfg: Distill2DConfig) -> None:
    _check(cfg.steps >= 1 and cfg.batch_size >= 1, "steps and batch_size must be at least 1")
    _check(cfg.lr > 0 and cfg.fake.lr > 0, "lr and fake.lr must be > 0")
    ts = list(cfg.timesteps)
    _check(len(ts) >= 1 and all(0 <= t <= 999 for t in ts) and ts == sorted(ts, reverse=True) and len(set(ts)) == len(ts),
           f"timesteps must be distinct, descending and in [0, 999], got {ts}")
    c = cfg.core
    _check(c.weighting in WEIGHTINGS, f"core.weighting must be one of {', '.join(WEIGHTINGS)}, got {c.weighting!r}")
    _check(c.reduction in ("mean", "sum"), f"core.reduction must be mean or sum, got {c.reduction!r}")
    _check(c.space in ("latent", "image"), f"core.space must be latent or image, got {c.space!r}")
    _check(0.0 <= c.t_min < c.t_max <= 1.0, "need 0 <= core.t_min < core.t_max <= 1")
    _check(c.real_guidance_scale >= 0 and c.fake_guidance_scale >= 0, "guidance scales must be >= 0")
    f = cfg.fake
    _check(f.rank >= 1 and f.steps_per_student_step >= 1, "fake.rank and fake.steps_per_student_step must be >= 1")
    _check(0.0 <= f.t_min < f.t_max <= 1.0 and 0.0 <= f.null_prompt_prob <= 1.0,
           "need 0 <= fake.t_min < fake.t_max <= 1 and fake.null_prompt_prob in [0, 1]")
    r = cfg.regression
    _check(r.weight >= 0 and r.pairs >= 1 and r.sampler_steps >= 1 and r.batch_size >= 1,
           "regression.weight must be >= 0 and regression.pairs/sampler_steps/batch_size >= 1")
    _check(r.metric in ("latent_l2", "lpips"), f"regression.metric must be latent_l2 or lpips, got {r.metric!r}")
    g = cfg.gan
    _check(g.generator_weight >= 0 and g.discriminator_weight >= 0 and g.lr > 0, "gan weights must be >= 0 and gan.lr > 0")
    _check(cfg.real_images >= 1, f"real_images must be at least 1, got {cfg.real_images}")
    _check(0.0 <= cfg.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    _check(cfg.mixed_precision in ("auto", "no", "fp16", "bf16"), "mixed_precision must be auto, no, fp16 or bf16")
    j = cfg.trajectory
    _check(j.loss in ("l2", "l1"), f"trajectory.loss must be l2 or l1, got {j.loss!r}")
    power = j.start_steps >= 2 and (j.start_steps & (j.start_steps - 1)) == 0
    _check(power and 1 <= j.end_steps < j.start_steps and (j.end_steps & (j.end_steps - 1)) == 0,
           f"trajectory.start_steps and end_steps must be powers of two with start > end >= 1, got "
           f"{j.start_steps} and {j.end_steps}")
    _check(j.round_steps >= 1 and j.stage1_steps >= 0, "trajectory.round_steps must be >= 1, stage1_steps >= 0")
    _check(1.0 <= j.w_min <= j.w_max, f"need 1 <= trajectory.w_min <= trajectory.w_max, got {j.w_min}, {j.w_max}")
    _check(j.w_embed_dim >= 2 and j.w_embed_dim % 2 == 0, "trajectory.w_embed_dim must be even and >= 2")
    for name in ("sample_every", "checkpoint_every", "log_every"):
        _check(getattr(cfg, name) >= 1, f"{name} must be at least 1")
