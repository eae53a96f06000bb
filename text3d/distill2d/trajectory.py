"""Trajectory-based distillation: knowledge (KD), progressive (PD) and guided (w-conditioned) distillation.

A run is a list of phases, each training a student UNet from a frozen phase teacher; each finished
phase is saved as a complete SD folder in ``OUT/phases/NAME`` (a checkpoint per PD round), and the
next phase's teacher is that student.

* **kd** (Luhman & Luhman): (noise, teacher DDIM sample) pairs made once and cached, then a
  one-step student regressed on them (L2 or L1).
* **pd** (Salimans & Ho): rounds ``start -> start/2 -> ... -> end`` steps; the student matches two
  teacher DDIM steps with one through the x-target of :func:`~text3d.teacher.sampling.progressive_target`,
  weighted by the truncated SNR ``max(ab/(1-ab), 1)``; the first round's teacher uses CFG, so every
  student runs one pass per step.
* **guided** (Meng et al.): stage 1, a student whose UNet takes the guidance scale w as
  ``timestep_cond`` (diffusers' ``time_cond_proj_dim``; its projection starts at zero, so the
  student starts exactly at the teacher) learns the teacher's CFG output for w ~ U[w_min, w_max];
  stage 2, progressive distillation of it with w kept as an input.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from text3d.distill2d.config import Distill2DConfig, total_steps
from text3d.distill2d.data import encode_images, real_images, regression_pairs
from text3d.distill2d.results import EVAL_DIR, SUMMARY, DistillResult, evaluate_student
from text3d.distill2d.student import save_student
from text3d.distill2d.processes import all_finite, map_location
from text3d.distill2d.trainer import CHECKPOINT, RunCheckpoint, setup_run
from text3d.report.curves import TrainLog
from text3d.report.page import write_run_page
from text3d.errors import CheckpointError, UserError
from text3d.teacher.sampling import (ddim_timesteps, guidance_embedding, guidance_conditioned, predict_x0,
                                     progressive_target)
from text3d.teacher.teacher import Teacher
from text3d.runtime.checkpoint import load_checkpoint, save_checkpoint
from text3d.runtime.loop import TrainingLoop
from text3d.runtime.signals import StopRequest
from text3d.runtime.seed import rng_state, set_rng_state

PHASES_DIR = "phases"


@dataclass
class Phase:
    name: str  # folder name under OUT/phases
    kind: str  # kd | w | pd
    steps: int
    teacher_steps: int = 0  # pd: the phase teacher's DDIM steps
    student_steps: int = 0  # pd: the student's
    w_conditioned: bool = False


def pd_rounds(start: int, end: int) -> list[tuple[int, int]]:
    """(teacher steps, student steps) of each progressive-distillation round: 64 -> 32 -> ... -> end."""
    rounds, n = [], start
    while n > end:
        rounds.append((n, n // 2))
        n //= 2
    return rounds


def split_steps(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights`` by rounding the running sums down: the parts add up to
    ``total``, weights that divide it evenly get exactly their share, and the last part is at least 1 (for
    ``total`` >= 1 and a last weight > 0)."""
    whole, parts, done, running = sum(weights), [], 0, 0
    for weight in weights:
        running += weight
        upto = total * running // whole
        parts.append(upto - done)
        done = upto
    return parts


def plan(cfg: Distill2DConfig) -> list[Phase]:
    """The run's phases. Without ``steps``, each PD round has ``trajectory.round_steps`` updates and guided's
    stage 1 ``trajectory.stage1_steps``; with it, ``steps`` is the total: guided's stage 1 gets its share of it
    (rounded, at least 1, leaving at least 1 for stage 2), the rounds split the rest evenly (the last rounds
    get the remainder). Phases left with no update are skipped: the next one starts from the student before
    it, so a run of fewer steps than rounds still ends with the ``end_steps`` student."""
    j = cfg.trajectory
    if cfg.method == "kd":
        return [Phase("kd", "kd", total_steps(cfg))]
    rounds = pd_rounds(j.start_steps, j.end_steps)
    stage1, per_round = (j.stage1_steps if cfg.method == "guided" else 0), [j.round_steps] * len(rounds)
    if cfg.steps is not None:
        whole = stage1 + sum(per_round)
        if stage1 > 0:
            stage1 = min(max(1, (cfg.steps * stage1 + whole // 2) // whole), max(1, cfg.steps - 1))
        per_round = split_steps(cfg.steps - stage1, per_round)
    phases = []
    if cfg.method == "guided":
        phases.append(Phase("guided_w", "w", stage1, w_conditioned=True))
    prefix = "guided_pd" if cfg.method == "guided" else "pd"
    for (teacher_steps, student_steps), steps in zip(rounds, per_round):
        phases.append(Phase(f"{prefix}_{student_steps}", "pd", steps, teacher_steps, student_steps,
                            w_conditioned=cfg.method == "guided"))
    return [p for p in phases if p.steps > 0]


def w_conditioned_unet(unet, dim: int):
    """A copy of ``unet`` that also takes a guidance embedding [B, dim] as ``timestep_cond``; the new
    projection is zero, so the copy computes exactly what ``unet`` computes."""
    from diffusers import UNet2DConditionModel

    from text3d.teacher.loader import quiet_hf

    with quiet_hf():
        new = UNet2DConditionModel.from_config({**dict(unet.config), "time_cond_proj_dim": dim})
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any("cond_proj" not in k for k in missing):
        raise ValueError(f"cannot add a guidance input to this UNet (missing {missing[:3]}, unexpected {unexpected[:3]})")
    torch.nn.init.zeros_(new.time_embedding.cond_proj.weight)
    return new


class TrajectoryTrainer(RunCheckpoint):
    def __init__(self, cfg: Distill2DConfig, out: Path, teacher=None, show_progress: bool = True):
        self.base = setup_run(self, cfg, out, teacher, show_progress)
        self.phases = plan(cfg)
        self.phase_index, self.step = 0, 0  # step counts within the phase
        self._real = None
        self._pairs = None
        self.saved: list[Path] = []

    # --------------------------------------------------------------- phases
    def _phase_teacher(self, index: int) -> Teacher:
        if index == 0:
            return self.base
        from text3d.teacher import load_teacher

        return load_teacher(str(self.out / PHASES_DIR / self.phases[index - 1].name), self.device)

    def _start_phase(self, index: int, teacher: Teacher) -> None:
        phase = self.phases[index]
        self.teacher = teacher
        from text3d.teacher.loader import quiet_hf

        with quiet_hf():
            if phase.kind == "w" and not guidance_conditioned(teacher):
                unet = w_conditioned_unet(teacher.unet, self.cfg.trajectory.w_embed_dim)
            else:
                unet = copy.deepcopy(teacher.unet)
            unet = unet.to(self.device, torch.float32).requires_grad_(True).train()
        if self.cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.unet, self.optimizer = self.accelerator.prepare(unet, optimizer)
        self.phase = phase

    # ----------------------------------------------------------------- data
    def real_batch(self, batch: int) -> tuple[torch.Tensor, list[str]]:
        if self._real is None:
            images, captions = real_images(self.cfg.real_data, self.cfg.real_images, self.base.image_size, self.cfg.seed)
            self._real = (encode_images(self.base, images), captions)
        latents, captions = self._real
        idx = torch.randint(len(latents), (batch,))
        return latents[idx].to(self.device), [captions[int(i)] for i in idx]

    def draw_w(self, batch: int) -> torch.Tensor:
        j = self.cfg.trajectory
        return (j.w_min + (j.w_max - j.w_min) * torch.rand(batch)).to(self.device)

    def _w_kwargs(self, teacher_or_dim, w: torch.Tensor | None) -> dict:
        dim = teacher_or_dim if isinstance(teacher_or_dim, int) else guidance_conditioned(teacher_or_dim)
        if not dim or w is None:
            return {}
        return {"timestep_cond": guidance_embedding(w, dim)}

    def student_eps(self, z: torch.Tensor, t, cond: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device).long().reshape(-1).expand(z.shape[0])
        dim = int(getattr(self.accelerator.unwrap_model(self.unet).config, "time_cond_proj_dim", None) or 0)
        cameras = {"class_labels": self.teacher.camera_labels(z.shape[0]).float()} if self.teacher.camera_dim else {}
        out = self.unet(z, t, encoder_hidden_states=cond.float(), return_dict=False, **self._w_kwargs(dim, w),
                        **cameras)[0]
        return self.teacher.to_eps(out.float()[:, : self.teacher.latent_channels], z, t)

    def teacher_eps(self, z: torch.Tensor, t, cond, uncond, w: torch.Tensor | None) -> torch.Tensor:
        """The phase teacher: CFG at ``w`` for an ordinary UNet (the original teacher), a single pass
        with ``w`` as input for a guidance-conditioned one, a single conditional pass otherwise."""
        if guidance_conditioned(self.teacher):
            return self.teacher.predict_eps(z, t, cond, **self._w_kwargs(self.teacher, w))
        if self.teacher is self.base and w is not None:
            return self.teacher.predict_eps(z, t, cond, uncond, guidance_scale=w.view(-1, 1, 1, 1))
        return self.teacher.predict_eps(z, t, cond)

    # ---------------------------------------------------------------- losses
    def kd_data(self) -> dict:
        """KD's (noise, teacher sample) pairs, made once and cached (:func:`.data.regression_pairs`)."""
        if self._pairs is None:
            self._pairs = regression_pairs(self.base, self.prompts, self.cfg.regression, self.cfg.seed,
                                           self.out / "cache" / "kd_pairs.pt", self.show_progress,
                                           purpose="the kd student's training data")
        return self._pairs

    def kd_loss(self) -> torch.Tensor:
        self.kd_data()
        idx = torch.randint(len(self._pairs["latents"]), (self.cfg.batch_size,))
        noise = self._pairs["noise"][idx].to(self.device)
        target = self._pairs["latents"][idx].to(self.device)
        cond = self.base.encode_prompts([self._pairs["prompts"][int(i)] for i in idx])
        t = self.base.num_train_timesteps - 1
        pred = predict_x0(self.base, noise, self.student_eps(noise, t, cond), t)
        if self.cfg.trajectory.loss == "l1":
            return F.l1_loss(pred, target)
        return F.mse_loss(pred, target)

    def w_loss(self) -> torch.Tensor:
        batch = self.cfg.batch_size
        x, captions = self.real_batch(batch)
        cond, uncond = self.base.encode_prompts(captions), self.base.encode_prompts([self.cfg.negative_prompt] * batch)
        t = torch.randint(0, self.base.num_train_timesteps, (batch,)).to(self.device)
        z = self.base.add_noise(x, torch.randn(x.shape).to(self.device), t)
        w = self.draw_w(batch)
        with torch.no_grad():
            target = self.base.predict_eps(z, t, cond, uncond, guidance_scale=w.view(-1, 1, 1, 1))
        return F.mse_loss(self.student_eps(z, t, cond, w), target)

    def pd_loss(self) -> torch.Tensor:
        phase, batch = self.phase, self.cfg.batch_size
        grid = ddim_timesteps(self.base.num_train_timesteps, phase.teacher_steps).tolist()
        i = int(torch.randint(phase.student_steps, ()))
        t, t_mid = grid[2 * i], grid[2 * i + 1]
        t_next = grid[2 * i + 2] if 2 * i + 2 < len(grid) else -1
        x, captions = self.real_batch(batch)
        cond, uncond = self.base.encode_prompts(captions), self.base.encode_prompts([self.cfg.negative_prompt] * batch)
        z = self.base.add_noise(x, torch.randn(x.shape).to(self.device), torch.full((batch,), t, device=self.device))
        w = self.draw_w(batch) if phase.w_conditioned else None
        if w is None and self.teacher is self.base:  # first plain PD round: the CFG teacher at a fixed scale
            w = torch.full((batch,), self.cfg.trajectory.guidance_scale, device=self.device)
        with torch.no_grad():
            target = progressive_target(self.base, lambda zz, tt: self.teacher_eps(zz, tt, cond, uncond, w), z, t,
                                        t_mid, t_next)
        pred = predict_x0(self.base, z, self.student_eps(z, t, cond, w if phase.w_conditioned else None), t)
        ab = self.base.alphas_cumprod[t]
        weight = torch.clamp(ab / (1.0 - ab), min=1.0)  # truncated SNR
        return weight * F.mse_loss(pred, target)

    # ------------------------------------------------------------------ loop
    def train_step(self) -> float:
        loss = {"kd": self.kd_loss, "w": self.w_loss, "pd": self.pd_loss}[self.phase.kind]()
        self.optimizer.zero_grad(set_to_none=True)
        if not all_finite(self.accelerator, loss):  # every process skips, or none (DDP's all-reduce)
            self.nonfinite.skip(f"{self.phase.name} loss", self.step + 1)  # NumericalError after max_nonfinite_steps
            return float("nan")
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.unet.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"phase": self.phase_index, "step": self.step, "student": self.accelerator.unwrap_model(self.unet).state_dict(),
                "optimizer": self.optimizer.state_dict(), "rng": rng_state()}

    def load(self) -> None:
        state = load_checkpoint(self.out / CHECKPOINT, map_location=map_location(self.device))
        index = int(state.get("phase", -1))
        if not 0 <= index <= len(self.phases):
            raise CheckpointError(f"checkpoint phase {index} does not match this run's {len(self.phases)} phases")
        self.phase_index, self.step = index, int(state["step"])
        if index < len(self.phases) and "student" in state:
            self._start_phase(index, self._phase_teacher(index))
            try:
                self.accelerator.unwrap_model(self.unet).load_state_dict(state["student"])
                self.optimizer.load_state_dict(state["optimizer"])
            except (KeyError, RuntimeError, ValueError) as exc:
                raise CheckpointError(f"checkpoint does not match this run's student ({str(exc)[:160]})") from None
        set_rng_state(state["rng"])

    def finish_phase(self, seconds: float | None = None) -> Path:
        """Save the phase's student; its card records the phase's wall time in this session (``seconds``)
        and the steps of every phase up to this one (``steps_cumulative``)."""
        phase = self.phase
        unet = copy.deepcopy(self.accelerator.unwrap_model(self.unet))
        card = phase_card(phase, self.cfg, self.base.num_train_timesteps, self.base.source)
        card["steps_cumulative"] = sum(p.steps for p in self.phases[: self.phase_index + 1])
        if seconds is not None:
            card["phase_seconds_this_session"] = round(float(seconds), 2)
        path = save_student(self.out / PHASES_DIR / phase.name, unet, self.base, card)
        self.saved.append(path)
        return path

    def _step(self, step: int) -> dict:
        loss = self.train_step()
        self.step = step
        return {"loss": loss} if math.isfinite(loss) else {"loss": loss, "skipped": 1.0}

    def fit(self) -> list[Path]:
        """Every phase from the current one on: one TrainingLoop a phase (checkpoints every ``checkpoint_every``
        steps; the phase's end saves its student and a boundary checkpoint), one Ctrl-C handler for all."""
        main = self.accelerator.is_main_process
        if any(p.kind == "kd" for p in self.phases[self.phase_index:]):
            self.kd_data()  # made (or read) before the loop, with its own progress bar; draws no random numbers
        with StopRequest() as stop:
            while self.phase_index < len(self.phases):
                if self.step == 0 or not hasattr(self, "unet"):
                    self._start_phase(self.phase_index, self._phase_teacher(self.phase_index))
                phase = self.phases[self.phase_index]
                phase_start = time.perf_counter()
                log = TrainLog(self.out, phase.name, resume_step=self.step)  # train_log.jsonl, curves.png

                def save(log=log) -> Path:
                    path = self.save()
                    if main:
                        log.flush()  # the log holds what the checkpoint holds
                    return path

                TrainingLoop(phase.steps, self.step, description=f"distilling ({self.cfg.method}, {phase.name})",
                             show_progress=self.show_progress, save=save,
                             checkpoint_every=self.cfg.checkpoint_every, save_last=False,
                             log_every=self.cfg.log_every, show=lambda s: {"loss": s["loss"]},
                             log=lambda step, s, log=log: log.add(step, {"loss": s["loss"]}),
                             nonfinite=self.nonfinite, stop=stop, where=f" in phase {phase.name}",
                             resume=f"text3d distill2d --resume {self.out}").run(self._step)
                if main:
                    log.flush()
                    log.plot(f"distill2d {self.cfg.method}")
                    self.finish_phase(time.perf_counter() - phase_start)
                self.phase_index, self.step = self.phase_index + 1, 0
                del self.unet
                self.save_boundary()
        return self.saved

    def save_boundary(self) -> None:
        """A checkpoint between phases: the next phase starts from the saved folder of the last one."""
        if self.accelerator.is_main_process:
            save_checkpoint(self.out / CHECKPOINT, {"phase": self.phase_index, "step": 0, "rng": rng_state()})


def phase_card(phase: Phase, cfg: Distill2DConfig, T: int, teacher_source) -> dict:
    card = {"kind": "text3d distilled student", "method": cfg.method, "phase": phase.name,
            "steps_trained": phase.steps, "teacher": str(teacher_source)}
    if phase.kind == "kd":
        card.update(timesteps=[T - 1], sampler="renoise", guidance_scale=1.0)
    elif phase.kind == "w":
        card.update(timesteps=None, sampler="ddim", guidance_scale=cfg.trajectory.guidance_scale,
                    guidance_conditioned=True, w_range=[cfg.trajectory.w_min, cfg.trajectory.w_max])
    else:
        card.update(timesteps=ddim_timesteps(T, phase.student_steps).tolist(), sampler="ddim",
                    guidance_scale=cfg.trajectory.guidance_scale if phase.w_conditioned else 1.0,
                    guidance_conditioned=phase.w_conditioned)
    return card


def run_trajectory(trainer: TrajectoryTrainer, evaluate: bool):
    from text3d.runtime.atomic import atomic_write_text

    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    final = trainer.out / PHASES_DIR / trainer.phases[-1].name
    if not final.is_dir():
        raise UserError(f"the run ended without its final student {final}")
    student = trainer.out / "student"
    if trainer.accelerator.is_main_process:
        import shutil

        from text3d.runtime.atomic import atomic_dir

        with atomic_dir(student) as tmp:
            shutil.copytree(final, tmp, dirs_exist_ok=True)
    scores = evaluate_student(student, trainer.out / EVAL_DIR, trainer.prompts,
                              show_progress=trainer.show_progress) if evaluate else None
    summary = {"method": trainer.cfg.method, "phases": [p.name for p in trainer.phases],
               "train_seconds_this_session": round(seconds, 2), "teacher": str(trainer.base.source),
               "student": str(student), "scores": scores}
    atomic_write_text(trainer.out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    write_run_page(trainer.out, f"distill2d {trainer.cfg.method}")  # index.html: samples, curves, scores
    steps = sum(p.steps for p in trainer.phases)
    return DistillResult(trainer.out, steps, seconds, student, scores)


