"""The 3D optimisation loop: random cameras -> render -> guidance -> Adam, with checkpoints.

The trainer owns the particles (``train.particles`` independent renderers, each with its own field
and background) and one Adam optimiser over all of them; each step draws one particle, and only
that particle's parameters receive gradients, so particles never influence each other except
through a guidance's shared state (VSD's LoRA). The guidance only ever sees rendered images, the
cameras and one prompt per view. All randomness comes from torch's global RNG, whose state is
saved in every checkpoint with every particle and the guidance's state, so a resumed run
continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

from text3d.cameras import jittered_light_dirs, sample_cameras
from text3d.generate.config import (GUIDANCE_REGISTRY, STAGE_REGISTRY, Guidance, RunConfig, TrainConfig,
                                    lr_factor, render_resolution, run_progress, stage_checkpoint, to_yaml,
                                    training_cameras)
from text3d.errors import CheckpointError
from text3d.prompts import prompts_for_cameras
from text3d.renderers.protocol import Renderer
from text3d.report.curves import TrainLog
from text3d.runtime.checkpoint import load_checkpoint, load_module_state, save_checkpoint
from text3d.generate.preview import save_run_preview
from text3d.generate.reference import ReferenceView
from text3d.runtime.loop import NonFiniteSteps, TrainingLoop
from text3d.runtime.preview import save_preview
from text3d.runtime.seed import rng_state, set_rng_state
from text3d.utils.backends import fused_optimizer_kwargs

SHADINGS = ("albedo", "lambertian", "textureless")


def build_guidance(cfg: RunConfig, teacher) -> Guidance:
    """The guidance registered as ``cfg.guidance``, built from its section of the config (``cfg.<name>``)."""
    method = GUIDANCE_REGISTRY.get(cfg.guidance)
    return method.build(teacher, getattr(cfg, method.name), negative_prompt=cfg.prompts.negative)


def opacity_entropy(opacity: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Binary entropy of each pixel's accumulated opacity, summed over the pixels and averaged over the
    images: zero for a render that is either solid or empty at every pixel. A field that lightens its
    colour by letting the white background through (translucent crimson reads as pink) pays for it, and
    the baked, opaque mesh keeps the colour the teacher saw."""
    o = opacity.float().clamp(eps, 1.0 - eps)
    entropy = -(o * o.log() + (1.0 - o) * (1.0 - o).log())
    return entropy.flatten(1).sum(1).mean()


def load_particles(particles: list, state: dict) -> None:
    """Load every particle's weights from a checkpoint (one-line CheckpointError on a mismatch)."""
    states = state.get("particles")
    if not isinstance(states, list) or len(states) != len(particles):
        count = len(states) if isinstance(states, list) else 0
        raise CheckpointError(f"the checkpoint holds {count} particle(s), this run has {len(particles)}")
    for renderer, particle_state in zip(particles, states):
        load_module_state(renderer, {"renderer": particle_state}, "renderer")


def stage_train_config(cfg: RunConfig, stage: str) -> TrainConfig:
    """The loop settings of a stage, from its registry entry: ``train`` for the NeRF, the stage's own
    steps/resolution/lr for meshes."""
    return STAGE_REGISTRY.get(stage).train_config(cfg)


def build_stage_particles(stage: str, cfg: RunConfig, device: torch.device,
                          sources: list[Renderer] | None) -> list[Renderer]:
    """The particles of ``stage``, built by its registry entry: fresh NeRFs for stage 1, mesh-stage models
    from the previous stage's particles otherwise."""
    return STAGE_REGISTRY.get(stage).build(cfg, device, sources)


class AssetTrainer:
    """Optimises ``train.particles`` assets of one stage (NeRF, DMTet geometry or surface texture) against one
    guidance (SDS or VSD)."""

    def __init__(self, cfg: RunConfig, teacher, device: torch.device, run_dir: Path,
                 show_progress: bool = True, stage: str = "nerf", sources: list[Renderer] | None = None,
                 with_guidance: bool = True):
        self.cfg, self.teacher, self.device, self.run_dir = cfg, teacher, device, Path(run_dir)
        self.show_progress, self.stage = show_progress, stage
        self.kind = STAGE_REGISTRY.get(stage)  # the stage's registry entry
        self.train_cfg = stage_train_config(cfg, stage)
        self.checkpoint_path = self.run_dir / stage_checkpoint(stage)
        self.particles: list[Renderer] = build_stage_particles(stage, cfg, device, sources)
        self.guidance = build_guidance(cfg, teacher) if with_guidance else None
        # the stage's pinned front view (text3d.generate.reference), when it has one: sampled on first use, so a
        # resumed run takes it from its checkpoint without drawing it again (the `reference` property)
        stage_cfg = getattr(cfg, stage, None)
        self._reference_cfg = stage_cfg if with_guidance and getattr(stage_cfg, "reference_weight", 0.0) > 0 else None
        self._reference: ReferenceView | None = None
        groups = []
        for renderer in self.particles:
            background = [p for p in renderer.background.parameters() if p.requires_grad]
            background_ids = {id(p) for p in background}
            groups.append({"params": [p for p in renderer.parameters() if id(p) not in background_ids
                                      and p.requires_grad], "lr": self.train_cfg.lr})
            if background and self.train_cfg.lr_background > 0:
                groups.append({"params": background, "lr": self.train_cfg.lr_background})
        # the fused kernel: 4x faster on the CPU for the hash tables (scripts/bench_step.py)
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.99), eps=1e-15, **fused_optimizer_kwargs(device))
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]  # scaled by lr_factor each step
        self.step = 0
        self.nonfinite = NonFiniteSteps(cfg.train.max_nonfinite_steps, self.checkpoint_path,
                                        "try a lower train.lr or sds.guidance_scale")

    @property
    def reference(self) -> ReferenceView | None:
        """The stage's reference view, or None without one. The teacher samples it on first use (the global RNG
        left as it was, so the run's draws do not depend on when) and it is written to ``{stage}_reference.png``;
        :meth:`load` sets it from the checkpoint instead."""
        if self._reference is None and self._reference_cfg is not None:
            with torch.random.fork_rng(devices=[]):
                self._reference = ReferenceView.sample(self.teacher, self.cfg, self._reference_cfg, self.device)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_preview([self._reference.image.cpu()], self.run_dir / f"{self.stage}_reference.png")
        return self._reference

    @property
    def renderer(self) -> Renderer:
        """The first particle (the only one unless ``train.particles`` > 1)."""
        return self.particles[0]

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"step": self.step, "particles": [r.state_dict() for r in self.particles],
                "optimizer": self.optimizer.state_dict(),
                "guidance": self.guidance.state_dict() if self.guidance is not None else {},
                **({"reference": self.reference.state_dict()} if self.reference is not None else {}),
                "rng": rng_state(), "config": to_yaml(self.cfg)}

    def save(self) -> Path:
        return save_checkpoint(self.checkpoint_path, self.state_dict())

    @property
    def finished(self) -> bool:
        return self.step >= self.train_cfg.steps

    def load(self, path: Path | None = None) -> int:
        state = load_checkpoint(path or self.checkpoint_path, map_location=self.device)
        load_particles(self.particles, state)
        load_module_state(self.optimizer, state, "optimizer")
        if self.guidance is not None:
            load_module_state(self.guidance, state, "guidance")
        if self._reference_cfg is not None and "reference" in state:
            self._reference = ReferenceView.from_state(state["reference"], self.cfg, self._reference_cfg, self.device)
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        return self.step

    # ------------------------------------------------------------------ step
    def choose_shading(self, step: int) -> str:
        t = self.train_cfg
        if self.stage != "nerf":
            shadings = getattr(self.cfg, self.stage).shadings
            return shadings[int(torch.randint(len(shadings), ()))]
        if step <= t.albedo_warmup * t.steps:
            return "albedo"
        probs = torch.tensor([t.p_albedo, t.p_lambertian, t.p_textureless], dtype=torch.float64)
        return SHADINGS[int(torch.multinomial(probs / probs.sum(), 1))]

    def train_step(self, step: int) -> dict[str, float]:
        """One optimisation step (``step`` counts from 1). Returns scalar stats."""
        cfg, t = self.cfg, self.train_cfg
        index = int(torch.randint(len(self.particles), ())) if len(self.particles) > 1 else 0
        renderer = self.particles[index]
        renderer.train()
        progress = run_progress(t, step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * lr_factor(t, step)
        for particle in self.particles:  # every particle's schedule follows the step, drawn or not
            particle.anneal(progress)
        renderer.update_occupancy(step)
        cameras = sample_cameras(training_cameras(cfg.camera, t, step), t.batch_size).to(self.device)
        shading = self.choose_shading(step)
        light = jittered_light_dirs(cameras, t.light_jitter_deg)
        res = render_resolution(t, step)
        out = renderer(cameras, res, res, shading=shading, light_dirs=light, ambient=t.ambient)
        prompts = prompts_for_cameras(cfg.prompt, cameras, cfg.prompts, cfg.camera)
        g = self.guidance(out["rgb"], prompts, progress=progress, cameras=cameras)
        loss = g.loss
        reference_loss = self.reference.loss(renderer, res, t.ambient) if self.reference is not None else None
        if reference_loss is not None:
            loss = loss + reference_loss
        if t.lambda_orientation > 0 and "orientation_loss" in out:
            loss = loss + t.lambda_orientation * out["orientation_loss"]
        if t.lambda_sparsity > 0:
            loss = loss + t.lambda_sparsity * out["opacity_sparsity"]
        if t.lambda_opaque > 0:
            loss = loss + t.lambda_opaque * opacity_entropy(out["opacity"])
        # the stage's own regularisers (geometry: Laplacian, normal consistency), weighted by fields of its section
        for key, weight in self.kind.regularisers.items():
            loss = loss + getattr(getattr(cfg, self.stage), weight) * out[key]
        self.optimizer.zero_grad(set_to_none=True)
        stats = {"loss": float(loss.detach()), "t": float(g.t.float().mean())}
        if reference_loss is not None:
            stats["reference"] = float(reference_loss.detach())
        if not math.isfinite(stats["loss"]):
            return self._nonfinite(step, stats, "loss")
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, float("inf")))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return self._nonfinite(step, stats, "gradient")
        self.optimizer.step()
        stats["grad"] = g.grad_norm
        stats.update(self.guidance.update(g, prompts, cameras))
        return stats

    def _nonfinite(self, step: int, stats: dict, what: str) -> dict:
        self.nonfinite.skip(what, step)  # NumericalError after train.max_nonfinite_steps in a row
        stats["skipped"] = 1.0
        return stats

    # ------------------------------------------------------------------ loop
    def fit(self, callbacks: Iterable[Callable[["AssetTrainer", int, dict], None]] = ()) -> int:
        """Run from ``self.step + 1`` to ``train.steps``; returns the last completed step."""
        t = self.train_cfg
        prefix = "" if self.stage == "nerf" else f"{self.stage}_"

        log = TrainLog(self.run_dir, self.stage, resume_step=self.step)  # train_log.jsonl, curves.png

        def step_fn(step: int) -> dict:
            start = time.perf_counter()
            stats = self.train_step(step)
            self.step = step
            stats["seconds"] = time.perf_counter() - start
            log.add(step, stats)
            return stats

        def save() -> Path:
            path = self.save()
            log.flush()  # the log holds what the checkpoint holds
            return path

        def preview(step: int, stats: dict) -> None:
            self.preview(self.run_dir / "previews" / f"{prefix}step_{step:06d}.png")
            log.plot(self.cfg.prompt)

        TrainingLoop(
            t.steps, self.step, description=f"optimising ({self.stage})" if self.stage != "nerf" else "optimising",
            show_progress=self.show_progress, save=save, checkpoint_every=t.checkpoint_every,
            log_every=t.log_every, show=lambda s: {k: v for k, v in s.items() if k in ("loss", "t", "grad", "lora_loss")},
            every=[(t.preview_every, preview), *((1, lambda step, s, cb=cb: cb(self, step, s)) for cb in callbacks)],
            nonfinite=self.nonfinite, resume=f"text3d generate --resume {self.run_dir}").run(step_fn)
        log.plot(self.cfg.prompt)
        return self.step

    # --------------------------------------------------------------- preview
    def preview(self, path: Path) -> Path:
        return save_run_preview(self.particles, self.cfg, self.device, path)
