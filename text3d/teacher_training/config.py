"""The settings of a teacher training run (:class:`TeacherTrainConfig`), apart from the code that trains, so that
the command line can show their defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field

from text3d.teacher_training.models import Architecture


@dataclass
class TeacherTrainConfig:
    """Everything a teacher training run depends on (the defaults are the shipped ~2 h CPU run)."""

    out: str = "text3d/assets/teacher"
    work: str = "runs/teacher-train"
    vae_steps: int = 3000  # ~17 min at 0.35 s/step (2 cores)
    unet_steps: int = 7000  # ~90 min at 0.75-0.8 s/step (2 cores)
    vae_batch_size: int = 8  # small batches learn faster per image than 16 at the same cost
    batch_size: int = 32
    vae_lr: float = 1e-3
    lr: float = 6e-4  # 8e-4 beat 3e-4 clearly over 400 steps (held-out eps MSE 0.045 vs 0.059); 6e-4 hedges for 7000
    weight_decay: float = 0.01
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of the peak rate
    text_lr_scale: float = 1.0  # the text encoder's learning rate as a multiple of the UNet's
    camera_lr_scale: float = 1.0  # a view-aware teacher's camera MLP (unet.class_embedding): its rate as a multiple of
    #                             the UNet's
    kl_weight: float = 1e-4  # per latent element, against per-pixel L1 in [-1, 1]
    edge_weight: float = 0.5  # L1 of horizontal/vertical finite differences
    mse_weight: float = 5.0  # L2 next to L1: colour errors are large, L2 fixes them ~3x faster early on
    fg_weight: float = 4.0  # extra loss weight of object pixels (those unlike the image border)
    cond_drop: float = 0.1  # fraction of empty captions (classifier-free guidance)
    min_snr_gamma: float = 5.0  # 0 = plain epsilon MSE
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto = bf16 (fp16 without bf16) autocast on CUDA, fp32 on CPU
    threads: int = 0  # 0 = every core this process may use
    checkpoint_every: int = 250
    time_budget_min: float | None = None  # wall clock for this invocation; stages stop early, the model is written
    resume: bool = False
    fresh: bool = False  # delete the work folder's checkpoints and start over
    benchmark_steps: int = 2  # timed steps per stage before training, for the expected duration (0 = skip)
    preview: bool = True  # sample a grid of images from the written teacher into the work folder
    progress: bool = True
    command: str = ""  # the command line, recorded in the model card
    arch: Architecture = field(default_factory=Architecture)
