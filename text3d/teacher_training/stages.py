"""The two training stages of the embedded teacher and the loop that runs either of them.

Stage 1 (``VAEStage``): the AutoencoderKL learns to reconstruct 64x64 renders through 16x16x4
latents: L1 + 5 x L2 (L2 corrects the large colour errors of early training ~3x faster than L1
alone), object pixels weighted 5x against the white background, a gradient (edge) L1 term for
sharp edges, and a small KL term that keeps the posterior bounded and the decoder noise-tolerant.

Stage 2 (``DiffusionStage``): the UNet and the CLIP text encoder learn epsilon prediction on the
cached, scaled VAE latents of the whole dataset with Stable Diffusion's DDPM schedule; 10% of the
captions are replaced by "" (classifier-free guidance); Min-SNR-5 loss weights; an EMA of both
networks is what ships.

Every random draw of a step comes from the stage's own ``torch.Generator`` (saved in checkpoints)
and the batch order from :class:`~text3d.teacher_training.data.BatchOrder`, so a resumed run matches
an uninterrupted one bit for bit on the same machine and thread count.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from text3d.errors import UserError
from text3d.teacher_training.data import BatchOrder, images_to_model
from text3d.teacher_training.config import TeacherTrainConfig
from text3d.runtime.checkpoint import load_checkpoint, load_module_state, save_checkpoint
from text3d.runtime.loop import NonFiniteSteps, TrainingLoop
from text3d.runtime.signals import StopRequest

MAX_NONFINITE = 20  # consecutive NaN/inf steps before giving up


# ------------------------------------------------------------------ helpers


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    warmup = min(warmup, max(1, total // 10))
    if step <= warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32) for ``precision`` auto|fp32|bf16|fp16 on ``device``."""
    name = (precision or "auto").lower()
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    table = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise UserError(f"unknown precision {precision!r}: expected auto, fp32, bf16 or fp16")
    if table[name] is torch.float16 and device.type != "cuda":
        raise UserError("fp16 training needs CUDA; use bf16 or fp32 on the CPU")
    return table[name]


class EMA:
    """Exponential moving average of a module's parameters (warm-up: decay = min(d, (1+n)/(10+n)))."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = [params[n].detach().clone().float() for n in self.names]
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = dict(module.named_parameters())
        torch._foreach_lerp_(self.shadow, [params[n].detach().float() for n in self.names], 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        params = dict(module.named_parameters())
        for name, value in zip(self.names, self.shadow):
            params[name].copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": dict(zip(self.names, self.shadow))}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if list(shadow) != self.names or any(shadow[n].shape != s.shape for n, s in zip(self.names, self.shadow)):
            raise RuntimeError("EMA weights do not match the model")
        self.shadow = [shadow[n].float().clone().to(s.device) for n, s in zip(self.names, self.shadow)]
        self.updates = int(state["updates"])


class RunningLoss:
    """Mean of the last ``window`` values of each statistic (what the bar and the model card show)."""

    def __init__(self, window: int = 100):
        self.window = window
        self.values: dict[str, deque] = {}

    def add(self, stats: dict[str, float]) -> None:
        for key, value in stats.items():
            self.values.setdefault(key, deque(maxlen=self.window)).append(float(value))

    def means(self) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in self.values.items() if v}

    def state_dict(self) -> dict:
        return {k: torch.tensor(list(v), dtype=torch.float64) for k, v in self.values.items()}

    def load_state_dict(self, state: dict) -> None:
        self.values = {k: deque(v.tolist(), maxlen=self.window) for k, v in state.items()}


# ------------------------------------------------------------------ stages


class Stage:
    """Common state of a stage: step counter, generator, optimiser, loss window, elapsed time."""

    name = "stage"
    seed_offset = 0

    def __init__(self, cfg: TeacherTrainConfig, device: torch.device, total_steps: int, batch_size: int, n: int):
        self.cfg, self.device = cfg, device
        self.total_steps, self.batch_size = total_steps, batch_size
        self.step = 0
        self.elapsed = 0.0  # seconds of training over all invocations
        self.stopped_early = False  # the last invocation stopped at its time budget
        self.generator = torch.Generator().manual_seed(cfg.seed * 7919 + self.seed_offset)
        self.order = BatchOrder(n, batch_size, cfg.seed * 7919 + self.seed_offset)
        self.running = RunningLoss()
        self.amp = amp_dtype(cfg.precision, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp is torch.float16)
        self.nonfinite = NonFiniteSteps(MAX_NONFINITE, hint="resume from it with a lower learning rate")
        self.optimizer: torch.optim.Optimizer
        self.peak_lr = 0.0

    def autocast(self):
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(self.device)

    def modules(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules().values() for p in m.parameters() if p.requires_grad]

    def compute_loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def after_step(self) -> None:
        pass

    def train_step(self) -> dict[str, float]:
        """One optimisation step; returns its statistics (``skipped`` = 1 when the loss was not finite)."""
        step = self.step + 1
        for group in self.optimizer.param_groups:
            group["lr"] = group.get("lr_scale", 1.0) * self.peak_lr * lr_factor(
                step, self.total_steps, self.cfg.warmup_steps, self.cfg.min_lr_ratio)
        for module in self.modules().values():
            module.train()
        loss, stats = self.compute_loss(step)
        self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(stats["loss"]):
            return self._skip(step, stats, "loss")
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad = float(torch.nn.utils.clip_grad_norm_(self.trainable(), self.cfg.grad_clip))
        if not math.isfinite(grad) and not self.scaler.is_enabled():
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip(step, stats, "gradient")
        self.scaler.step(self.optimizer)  # skips the update itself on inf gradients under fp16
        self.scaler.update()
        self.after_step()
        self.step = step
        stats["grad"] = grad
        self.running.add(stats)
        return stats

    def _skip(self, step: int, stats: dict, what: str) -> dict:
        self.nonfinite.skip(f"{self.name} stage's {what}", step)  # NumericalError after MAX_NONFINITE in a row
        self.step = step  # the batch is consumed, so a resumed run stays in step
        return {**stats, "skipped": 1.0}

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = {"stage": self.name, "step": self.step, "total_steps": self.total_steps, "elapsed": self.elapsed,
                 "stopped_early": self.stopped_early, "generator": self.generator.get_state(),
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                 "running": self.running.state_dict(), "batch_size": self.batch_size}
        for key, module in self.modules().items():
            state[key] = module.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("stage") != self.name:
            raise UserError(f"checkpoint holds the {state.get('stage')!r} stage, not {self.name!r}")
        for key, module in self.modules().items():
            load_module_state(module, state, key)
        load_module_state(self.optimizer, state, "optimizer")
        self.generator.set_state(state["generator"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.running.load_state_dict(state.get("running", {}))
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        self.stopped_early = bool(state.get("stopped_early", False))
        if int(state.get("batch_size", self.batch_size)) != self.batch_size:
            raise UserError(f"the {self.name} checkpoint was trained with batch size {state['batch_size']}, "
                            f"this run asks for {self.batch_size}: resume with the same batch size")


class VAEStage(Stage):
    name = "vae"
    seed_offset = 1

    def __init__(self, cfg: TeacherTrainConfig, device: torch.device, vae, images_u8: np.ndarray):
        super().__init__(cfg, device, cfg.vae_steps, cfg.vae_batch_size, len(images_u8))
        self.vae, self.images = vae.to(device), images_u8
        self.peak_lr = cfg.vae_lr
        self.optimizer = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99),
                                           weight_decay=cfg.weight_decay)

    def modules(self):
        return {"vae": self.vae}

    def compute_loss(self, step):
        x = images_to_model(self.images, self.order.indices(step), self.device)
        noise = self.randn((x.shape[0], self.vae.config.latent_channels, x.shape[2] // 4, x.shape[3] // 4))
        with self.autocast():
            posterior = self.vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
            rec = self.vae.decode(z).sample
        return vae_loss(rec.float(), x, posterior, self.cfg.kl_weight, self.cfg.edge_weight, self.cfg.mse_weight,
                        self.cfg.fg_weight)


def pixel_weights(x: torch.Tensor, fg_weight: float, threshold: float = 0.04) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, H, W]: 1 + ``fg_weight`` where a pixel differs from its image's
    background (the median colour of the image border) by more than ``threshold`` in some channel.

    Objects cover ~15% of a render; without the weight the background dominates the loss and the
    VAE learns object colours last."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # [B, 3, 4W]
    background = border.median(dim=-1).values[..., None, None]
    foreground = ((x - background).abs().amax(dim=1, keepdim=True) > threshold).float()
    return 1.0 + fg_weight * foreground


def _wmean(err: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return err.mean()
    return (err * weight).sum() / (weight.sum() * err.shape[1])


def vae_loss(rec: torch.Tensor, x: torch.Tensor, posterior, kl_weight: float, edge_weight: float,
             mse_weight: float = 0.0, fg_weight: float = 0.0):
    """(loss, stats): L1 + mse_weight * MSE + edge_weight * L1 of finite differences + kl_weight * KL
    per latent element (images in [-1, 1])."""
    weight = pixel_weights(x, fg_weight) if fg_weight > 0 else None
    l1 = _wmean((rec - x).abs(), weight)
    mse = _wmean((rec - x).pow(2), weight)
    edge = ((rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean())
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    loss = l1 + mse_weight * mse + edge_weight * edge + kl_weight * kl
    with torch.no_grad():
        psnr = -10.0 * torch.log10(F.mse_loss(rec.clamp(-1, 1), x) / 4.0 + 1e-12)
    return loss, {"loss": float(loss.detach()), "l1": float(l1.detach()), "kl": float(kl.detach()),
                  "psnr": float(psnr)}


class DiffusionStage(Stage):
    name = "unet"
    seed_offset = 2

    def __init__(self, cfg: TeacherTrainConfig, device: torch.device, unet, text_encoder, scheduler,
                 latents: torch.Tensor, caption_ids: torch.Tensor, caption_index: np.ndarray, uncond_ids: torch.Tensor,
                 cameras: torch.Tensor | None = None, camera_drop: float = 0.0,
                 plain_caption_index: np.ndarray | None = None, suffix_drop: float = 0.0,
                 camera_droppable: np.ndarray | None = None):
        super().__init__(cfg, device, cfg.unet_steps, cfg.batch_size, len(latents))
        # a view-aware teacher (text3d.teacher_training.camera_input): each example's camera features [N, 16],
        # replaced by zeros ("no camera") for a fraction camera_drop of the examples drawn
        self.cameras = None if cameras is None else cameras.to(device)
        self.camera_drop = float(camera_drop)
        # which examples may lose their camera (None: all); the others always keep it, so that "no camera" stands
        # for the views those examples are not (e.g. a teacher also shown views from above samples the old
        # range of views without a camera)
        self.camera_droppable = (None if camera_droppable is None
                                 else torch.as_tensor(np.asarray(camera_droppable), dtype=torch.bool))
        # where the camera is kept, a fraction suffix_drop of the examples see their caption without its view
        # suffix (plain_caption_index: each example's plain caption in the same caption table), so the facing
        # direction has to come from the camera
        self.suffix_drop = float(suffix_drop)
        self.plain_caption_index = (None if plain_caption_index is None
                                    else torch.as_tensor(plain_caption_index, dtype=torch.long))
        if self.suffix_drop and (self.cameras is None or self.plain_caption_index is None):
            raise ValueError("suffix_drop needs cameras and each example's plain caption")
        self.unet, self.text_encoder = unet.to(device), text_encoder.to(device)
        self.latents = latents.to(device)  # already multiplied by the scaling factor
        self.caption_ids = caption_ids.to(device)
        self.caption_index = torch.as_tensor(caption_index, dtype=torch.long)
        self.uncond_ids = uncond_ids.reshape(1, -1).to(device)
        self.num_timesteps = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device, torch.float32)
        self.peak_lr = cfg.lr
        # a camera MLP (unet.class_embedding: a view-aware teacher) gets its own group and rate: it starts at zero
        # beside a trained UNet, so at the UNet's rate it hardly moves in a fine-tune's few thousand steps
        unet_params, camera = [], []
        for name, p in self.unet.named_parameters():
            (camera if name.startswith("class_embedding.") else unet_params).append(p)
        groups = [{"params": unet_params, "lr_scale": 1.0},
                  {"params": list(self.text_encoder.parameters()), "lr_scale": cfg.text_lr_scale}]
        if camera:
            groups.append({"params": camera, "lr_scale": cfg.camera_lr_scale})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        self.ema_unet = EMA(self.unet, cfg.ema_decay)
        self.ema_text = EMA(self.text_encoder, cfg.ema_decay)

    def modules(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}

    def compute_loss(self, step):
        idx = self.order.indices(step)
        batch = len(idx)
        z0 = self.latents[idx.to(self.device)]
        ids = self.caption_ids[self.caption_index[idx].to(self.device)]
        drop = (torch.rand(batch, generator=self.generator) < self.cfg.cond_drop).to(self.device)
        ids = torch.where(drop[:, None], self.uncond_ids.expand_as(ids), ids)
        t = torch.randint(0, self.num_timesteps, (batch,), generator=self.generator).to(self.device)
        noise = self.randn(z0.shape)
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1.0 - ab).sqrt() * noise
        kwargs = {}
        if self.cameras is not None:
            keep = torch.rand(batch, generator=self.generator) >= self.camera_drop
            if self.camera_droppable is not None:
                keep = keep | ~self.camera_droppable[idx]
            keep = keep.to(self.device)
            kwargs["class_labels"] = self.cameras[idx.to(self.device)] * keep[:, None].float()
            if self.suffix_drop:  # drawn only when on, so runs without it keep their random stream
                plain = keep & ~drop & (torch.rand(batch, generator=self.generator) < self.suffix_drop).to(self.device)
                plain_ids = self.caption_ids[self.plain_caption_index[idx].to(self.device)]
                ids = torch.where(plain[:, None], plain_ids, ids)
        with self.autocast():
            emb = self.text_encoder(ids).last_hidden_state
            pred = self.unet(zt, t, encoder_hidden_states=emb, **kwargs).sample
        per_sample = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        if self.cfg.min_snr_gamma > 0:
            snr = ab.flatten() / (1.0 - ab.flatten())
            weight = snr.clamp(max=self.cfg.min_snr_gamma) / snr
        else:
            weight = torch.ones_like(per_sample)
        loss = (weight * per_sample).mean()
        return loss, {"loss": float(loss.detach()), "mse": float(per_sample.detach().mean())}

    def after_step(self):
        self.ema_unet.update(self.unet)
        self.ema_text.update(self.text_encoder)

    def state_dict(self):
        return {**super().state_dict(), "ema_unet": self.ema_unet.state_dict(), "ema_text": self.ema_text.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        try:
            self.ema_unet.load_state_dict(state["ema_unet"])
            self.ema_text.load_state_dict(state["ema_text"])
        except (KeyError, RuntimeError) as exc:
            raise UserError(f"the unet checkpoint's EMA weights do not match this run ({exc})") from None


# ------------------------------------------------------------------ the loop


def save_stage(stage: Stage, path: Path, extra: dict) -> Path:
    return save_checkpoint(path, {**stage.state_dict(), **extra})


def load_stage_state(path: Path) -> dict:
    return load_checkpoint(path, map_location="cpu")


def run_stage(stage: Stage, checkpoint: Path, extra: dict, budget_s: float | None = None,
              stop: StopRequest | None = None, log: Callable[[str], None] = print,
              on_step: Callable[[Stage, dict], None] | None = None) -> Stage:
    """Train ``stage`` from its current step to ``stage.total_steps`` in a :class:`TrainingLoop`.

    Checkpoints (atomically) every ``checkpoint_every`` steps and at the end; stops early, with a
    checkpoint, when the next step would overrun ``budget_s`` seconds of wall clock; a signal in
    ``stop`` (installed by the caller; one is installed here when None) saves a checkpoint and raises
    :class:`Interrupted`. ``extra`` goes into every checkpoint.
    """
    stage.nonfinite.checkpoint = checkpoint

    def save() -> Path:
        stage.stopped_early = loop.stopped_early  # saved with the checkpoint the time budget ends on
        return save_stage(stage, checkpoint, extra)

    def step_fn(step: int) -> dict:
        t_step = time.perf_counter()
        stats = stage.train_step()
        stage.elapsed += time.perf_counter() - t_step
        return stats

    def show(stats: dict) -> dict:
        shown = stage.running.means()
        return {k: shown[k] for k in ("loss", "l1", "psnr", "mse") if k in shown} | {
            "lr": stage.optimizer.param_groups[0]["lr"]}

    loop = TrainingLoop(stage.total_steps, stage.step, description=stage.name, show_progress=stage.cfg.progress,
                        save=save, checkpoint_every=stage.cfg.checkpoint_every,
                        show=show, every=[(1, lambda step, stats: on_step(stage, stats))] if on_step else [],
                        nonfinite=stage.nonfinite, stop=stop, where=f" in the {stage.name} stage",
                        resume="the same command and --resume", budget_s=budget_s)
    stage.stopped_early = False
    loop.run(step_fn)
    if loop.stopped_early:
        log(f"{stage.name} stage: time budget reached after step {stage.step}/{stage.total_steps}")
    return stage
