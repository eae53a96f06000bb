"""The `text3d distill2d` training loop, one for every method.

One iteration = one student step (the score-distillation gradient of :mod:`text3d.guidance.core`
with the fake score as its baseline branch, plus DMD's regression and DMD2's generator GAN term when
enabled) followed by ``fake.steps`` updates of the fake score (the LoRA training step of
:mod:`text3d.guidance.lora` on detached student samples, plus DMD2's discriminator loss). The student runs under `accelerate` (DDP across processes, mixed precision on
CUDA); the LoRA and the GAN head average their gradients across processes by hand. All
randomness comes from torch's global RNG, saved in every checkpoint, so a resumed run continues
like an uninterrupted one.
"""

from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from text3d.distill2d.config import (LEAN_PREVIEW_PROMPTS, Distill2DConfig, apply_lean, lean_wanted,
                                     resolve_regression_pairs, total_steps)
from text3d.distill2d.data import encode_images, load_prompts, real_images, regression_pairs
from text3d.distill2d.gan import FakeScoreDiscriminator, discriminator_loss, generator_loss
from text3d.distill2d.processes import (all_finite, map_location, restore_process_rng, save_process_rng,
                                       shared_seed, warn_about_launch)
from text3d.distill2d.student import Student, save_student, student_card
from text3d.errors import UserError
from text3d.guidance.core import ScoreDistillation
from text3d.guidance.lora import LoRAScoreNetwork, lora_denoising_loss, optimizer_step
from text3d.runtime.checkpoint import load_checkpoint, load_module_state, save_checkpoint
from text3d.report.curves import TrainLog
from text3d.runtime.preview import save_preview
from text3d.runtime.loop import NonFiniteSteps, TrainingLoop
from text3d.runtime.atomic import atomic_write_text
from text3d.runtime.seed import rng_state, seed_everything, set_rng_state

CHECKPOINT = "checkpoints/last.pt"
CONFIG_NAME = "config.yaml"
STUDENT_DIR = "student"
PREVIEW_PROMPTS = 8


def _accelerator(cfg: Distill2DConfig):
    from accelerate import Accelerator

    from text3d.utils.backends import resolve_device

    warn_about_launch()  # accelerate launch --cpu --num_processes N: one process (processes.py)
    device = resolve_device(cfg.device)
    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if device.type != "cuda":
        precision = "no"
    return Accelerator(cpu=device.type == "cpu", mixed_precision=precision)


def setup_run(trainer, cfg: Distill2DConfig, out: Path, teacher, show_progress: bool):
    """What every 2D trainer starts with: accelerator, seed (per process), teacher and prompts; returns the teacher."""
    from text3d.teacher import load_teacher

    resolve_regression_pairs(cfg)  # a config built by hand: regression.pairs=None fixed as load_distill_config does
    trainer.cfg, trainer.out, trainer.show_progress = cfg, Path(out), show_progress
    trainer.nonfinite = NonFiniteSteps(cfg.max_nonfinite_steps, trainer.out / CHECKPOINT, "try a lower lr")
    trainer.accelerator = _accelerator(cfg)
    trainer.device = trainer.accelerator.device
    seed_everything(cfg.seed + trainer.accelerator.process_index)
    trainer.prompts = load_prompts(cfg.prompts_file)
    if not trainer.prompts:
        raise UserError("the prompts file holds no prompts")
    teacher = teacher if teacher is not None else load_teacher(cfg.teacher, trainer.device)
    # the memory-lean mode for SD-sized teachers on the CPU (config.apply_lean says what it changes)
    trainer.lean = lean_wanted(cfg, trainer.device.type, teacher.image_size)
    if trainer.lean:
        changed = apply_lean(cfg)
        teacher.set_memory_lean()
        if changed and trainer.accelerator.is_main_process:
            warnings.warn(f"memory-lean mode for a {teacher.image_size} px teacher on the CPU ({', '.join(changed)}; "
                          f"lean=off turns it off)")
    return teacher


def student_optimizer(params, cfg: Distill2DConfig) -> torch.optim.Optimizer:
    """The student's optimiser: AdamW, or torch's Adafactor (``optimizer=adafactor``: a factored second moment
    and no momentum, so a few MB of state instead of two fp32 copies of the UNet; its step is ``lr`` times the
    weight's RMS, relative like the paper's, with ``lr`` the cap of the relative step size)."""
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class RunCheckpoint:
    """What the 2D trainers share once :func:`setup_run` has run: the run folder's checkpoint, written by the
    main process only (``self.state_dict()`` is each trainer's own); the training log is a TrainLog (report)."""

    def save(self) -> Path:
        path = self.out / CHECKPOINT
        if self.accelerator.is_main_process:
            save_checkpoint(path, self.state_dict())
        return path


class Distill2DTrainer(RunCheckpoint):
    def __init__(self, cfg: Distill2DConfig, out: Path, teacher=None, show_progress: bool = True):
        self.teacher = setup_run(self, cfg, out, teacher, show_progress)
        self.student = Student(self.teacher, cfg.timesteps)  # before the LoRA touches the teacher's UNet
        if cfg.gradient_checkpointing:
            self.student.unet.enable_gradient_checkpointing()
        with shared_seed(self.accelerator, cfg.seed):  # the same initial LoRA and GAN head on every process
            self.fake = LoRAScoreNetwork(self.teacher, rank=cfg.fake.rank, alpha=cfg.fake.alpha)
            self.core = ScoreDistillation(self.teacher, cfg.core, lora=self.fake)
            self.disc = FakeScoreDiscriminator(self.fake, self.teacher) if cfg.gan.generator_weight > 0 else None
        fake_groups = [{"params": self.fake.trainable_parameters(), "lr": cfg.fake.lr}]
        if self.disc is not None:
            fake_groups.append({"params": list(self.disc.head.parameters()), "lr": cfg.gan.lr})
        self.fake_optimizer = torch.optim.AdamW(fake_groups, weight_decay=0.0)
        optimizer = student_optimizer(self.student.unet.parameters(), cfg)
        self.student.unet, self.optimizer = self.accelerator.prepare(self.student.unet, optimizer)
        self.ema = ({k: v.detach().clone() for k, v in self._student_unet().state_dict().items()}
                    if cfg.ema_decay > 0 else None)
        self.step = 0
        self.counts = {"student_steps": 0, "fake_steps": 0}
        self.train_seconds = 0.0  # wall time of the training steps over every invocation (kept in the checkpoint)
        self._pairs = None
        self._real = None

    # --------------------------------------------------------------- helpers
    def _student_unet(self):
        return self.accelerator.unwrap_model(self.student.unet)

    def _embed(self, prompts):
        return self.teacher.encode_prompts(list(prompts))

    def _uncond(self, batch: int):
        return self.teacher.encode_prompts([self.cfg.negative_prompt] * batch)

    def _noise(self, batch: int) -> torch.Tensor:
        shape = (batch, self.teacher.latent_channels, self.teacher.latent_size, self.teacher.latent_size)
        return torch.randn(shape, dtype=torch.float32).to(self.device)

    def draw_prompts(self, batch: int) -> list[str]:
        return [self.prompts[int(i)] for i in torch.randint(len(self.prompts), (batch,))]

    def student_sample(self, prompts, grad: bool) -> torch.Tensor:
        """x0 of a batch; multi-step students train step k (uniform) on their own earlier outputs."""
        cond = self._embed(prompts)
        k = int(torch.randint(len(self.cfg.timesteps), ())) if len(self.cfg.timesteps) > 1 else 0
        with torch.set_grad_enabled(grad):
            return self.student.generate(self._noise(len(prompts)), cond, steps=k + 1, grad_last=grad)

    def regression_data(self) -> dict:
        if self._pairs is None:
            self._pairs = regression_pairs(self.teacher, self.prompts, self.cfg.regression, self.cfg.seed,
                                           self.out / "cache" / "regression_pairs.pt", self.show_progress,
                                           purpose=f"{self.cfg.method}'s regression loss")
        return self._pairs

    def real_data(self) -> tuple[torch.Tensor, list[str]]:
        if self._real is None:
            images, captions = real_images(self.cfg.real_data, self.cfg.real_images, self.teacher.image_size,
                                           self.cfg.seed)
            self._real = (encode_images(self.teacher, images), captions)
        return self._real

    def _average_fake_grads(self) -> None:
        if self.accelerator.num_processes > 1:
            for group in self.fake_optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad = self.accelerator.reduce(p.grad, reduction="mean")

    # ------------------------------------------------------------------ steps
    def student_step(self) -> tuple[dict, torch.Tensor, list[str]]:
        cfg = self.cfg
        prompts = self.draw_prompts(cfg.batch_size)
        x0 = self.student_sample(prompts, grad=True)
        cond, uncond = self._embed(prompts), self._uncond(len(prompts))
        sd = self.core.from_latents(x0, cond, uncond)
        loss = sd.loss
        stats = {"score_grad": float(sd.grad.flatten(1).norm(dim=1).mean()), "t": float(sd.t.float().mean())}
        if cfg.regression.weight > 0:
            reg = self.regression_loss()
            stats["regression"] = float(reg.detach())
            loss = loss + cfg.regression.weight * reg
        if self.disc is not None:
            t = self.core.sample_t(x0.shape[0])
            logits = self.disc.logits(self.teacher.add_noise(x0.float(), self._noise(x0.shape[0]), t), t, cond)
            gen = generator_loss(logits)
            stats["gan_g"] = float(gen.detach())
            loss = loss + cfg.gan.generator_weight * gen
        if not all_finite(self.accelerator, loss):  # every process skips, or none (DDP's all-reduce)
            self.optimizer.zero_grad(set_to_none=True)
            return self._nonfinite(stats, "student loss"), x0.detach(), prompts
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.student.unet.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.counts["student_steps"] += 1
        self._update_ema()
        stats["loss"] = float(loss.detach())
        return stats, x0.detach(), prompts

    def regression_loss(self) -> torch.Tensor:
        data = self.regression_data()
        idx = torch.randint(len(data["latents"]), (self.cfg.batch_size,))
        noise = data["noise"][idx].to(self.device)
        target = data["latents"][idx].to(self.device)
        pred = self.student.generate(noise, self._embed([data["prompts"][int(i)] for i in idx]), grad_last=True)
        if self.cfg.regression.metric == "lpips":
            return self._lpips(pred, target)
        return F.mse_loss(pred.float(), target.float())

    def _lpips(self, pred, target):
        try:
            import lpips
        except ImportError:
            raise UserError("regression.metric=lpips needs the `lpips` package (pip install lpips) and its weights; "
                            "use regression.metric=latent_l2 otherwise") from None
        if not hasattr(self, "_lpips_net"):
            self._lpips_net = lpips.LPIPS(net="vgg").to(self.device).eval().requires_grad_(False)
        a = self.teacher.decode_latents(pred) * 2 - 1
        b = self.teacher.decode_latents(target).detach() * 2 - 1
        return self._lpips_net(a, b).mean()

    def fake_step(self, x0: torch.Tensor, prompts: list[str]) -> dict:
        cfg = self.cfg
        batch = x0.shape[0]
        cond, uncond = self._embed(prompts), self._uncond(batch)
        loss = lora_denoising_loss(self.fake, x0, cond, cfg.fake, uncond=uncond)
        stats = {"fake": float(loss.detach())}
        if self.disc is not None:
            real, captions = self.real_data()
            idx = torch.randint(len(real), (batch,))
            t_real, t_fake = self.core.sample_t(batch), self.core.sample_t(batch)
            real_noisy = self.teacher.add_noise(real[idx].to(self.device), self._noise(batch), t_real)
            fake_noisy = self.teacher.add_noise(x0.detach().float(), self._noise(batch), t_fake)
            d_loss = discriminator_loss(self.disc.logits(real_noisy, t_real, self._embed([captions[i] for i in idx])),
                                        self.disc.logits(fake_noisy, t_fake, self._embed(prompts)))
            stats["gan_d"] = float(d_loss.detach())
            loss = loss + cfg.gan.discriminator_weight * d_loss
        if not all_finite(self.accelerator, loss) or not optimizer_step(self.fake_optimizer, loss, cfg.max_grad_norm,
                                                                         self._average_fake_grads):
            return self._nonfinite(stats, "fake-score loss")
        self.counts["fake_steps"] += 1
        return stats

    def train_step(self) -> dict:
        """One student step, then ``fake.steps`` fake-score steps (the first on the
        student step's own samples, the others on fresh ones)."""
        stats, x0, prompts = self.student_step()
        for i in range(self.cfg.fake.steps):
            if i > 0:
                prompts = self.draw_prompts(self.cfg.batch_size)
                x0 = self.student_sample(prompts, grad=False)
            stats.update(self.fake_step(x0, prompts))
        return stats

    def _nonfinite(self, stats: dict, what: str) -> dict:
        self.nonfinite.skip(what, self.step + 1)  # NumericalError after max_nonfinite_steps steps in a row
        stats["skipped"] = 1.0
        return stats

    def _update_ema(self) -> None:
        if self.ema is None:
            return
        d = self.cfg.ema_decay
        with torch.no_grad():
            for k, v in self._student_unet().state_dict().items():
                if v.is_floating_point():
                    self.ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    self.ema[k].copy_(v)

    # ------------------------------------------------------------------ state
    def save(self) -> Path:
        save_process_rng(self.accelerator, self.out, self.step)  # each other process's noise (processes.py)
        return super().save()

    def state_dict(self) -> dict:
        state = {"step": self.step, "student": self._student_unet().state_dict(), "fake": self.fake.lora_state_dict(),
                 "optimizer": self.optimizer.state_dict(), "fake_optimizer": self.fake_optimizer.state_dict(),
                 "counts": dict(self.counts), "train_seconds": self.train_seconds, "rng": rng_state()}
        if self.ema is not None:
            state["ema"] = self.ema
        if self.disc is not None:
            state["head"] = self.disc.head.state_dict()
        return state

    def load(self) -> int:
        state = load_checkpoint(self.out / CHECKPOINT, map_location=map_location(self.device))
        load_module_state(self._student_unet(), state, "student")
        try:
            self.fake.load_lora_state_dict(state["fake"])
        except (KeyError, RuntimeError) as exc:
            from text3d.errors import CheckpointError

            raise CheckpointError(f"checkpoint does not match this run's fake score ({exc})") from None
        load_module_state(self.optimizer, state, "optimizer")
        load_module_state(self.fake_optimizer, state, "fake_optimizer")
        if self.disc is not None:
            load_module_state(self.disc.head, state, "head")
        if self.ema is not None and "ema" in state:
            self.ema = {k: v.clone() for k, v in state["ema"].items()}
        self.counts = dict(state.get("counts", self.counts))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        restore_process_rng(self.accelerator, self.out, self.step, self.cfg.seed)  # the other processes' own
        return self.step

    # ----------------------------------------------------------------- output
    @torch.no_grad()
    def preview(self, path: Path) -> Path:
        """One row per student timestep count (1..K) for fixed prompts and noise."""
        count = LEAN_PREVIEW_PROMPTS if getattr(self, "lean", False) else PREVIEW_PROMPTS
        prompts = [self.prompts[i * len(self.prompts) // count] for i in range(count)]
        g = torch.Generator("cpu").manual_seed(1234)
        shape = (count, self.teacher.latent_channels, self.teacher.latent_size, self.teacher.latent_size)
        z = torch.randn(shape, generator=g).to(self.device)
        cond = self._embed(prompts)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(99)
            rows = [self.teacher.decode_latents(self.student.generate(z, cond, steps=k)).cpu()
                    for k in range(1, len(self.cfg.timesteps) + 1)]
        return save_preview(rows, path)

    def export(self) -> Path:
        unet = copy.deepcopy(self._student_unet())
        if self.ema is not None:
            unet.load_state_dict(self.ema)
        card = student_card(self.cfg.timesteps, self.cfg.method, self.step, self.teacher.source)
        return save_student(self.out / STUDENT_DIR, unet, self.teacher, card)

    def fit(self) -> int:
        cfg = self.cfg
        log = TrainLog(self.out, resume_step=self.step)  # train_log.jsonl (main process), curves.png
        main = self.accelerator.is_main_process

        def step_fn(step: int) -> dict:
            t0 = time.perf_counter()
            stats = self.train_step()
            self.step = step
            stats["seconds"] = time.perf_counter() - t0
            self.train_seconds += stats["seconds"]
            return stats

        def sample(step: int, stats: dict) -> None:
            if self.accelerator.is_main_process:
                self.preview(self.out / "samples" / f"step_{step:06d}.png")
                log.plot(f"distill2d {cfg.method}")

        def save() -> Path:
            path = self.save()
            if main:
                log.flush()  # the log holds what the checkpoint holds
            return path

        if cfg.regression.weight > 0:
            self.regression_data()  # made (or read) before the loop, with its own progress bar; draws no random numbers
        TrainingLoop(total_steps(cfg), self.step, description=f"distilling ({cfg.method})",
                     show_progress=self.show_progress, save=save, checkpoint_every=cfg.checkpoint_every,
                     log_every=cfg.log_every,
                     show=lambda s: {k: v for k, v in s.items() if k in ("loss", "fake", "gan_d", "regression")},
                     log=log.add,
                     every=[(cfg.sample_every, sample)], nonfinite=self.nonfinite,
                     resume=f"text3d distill2d --resume {self.out}").run(step_fn)
        if main:
            log.flush()
            log.plot(f"distill2d {cfg.method}")
        return self.step


def write_config(out: Path, cfg: Distill2DConfig) -> Path:
    from omegaconf import OmegaConf

    return atomic_write_text(Path(out) / CONFIG_NAME, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
