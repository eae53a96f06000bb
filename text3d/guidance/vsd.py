"""Variational Score Distillation (ProlificDreamer): grad = w(t) (eps_hat_teacher^CFG - eps_hat_LoRA(c)).

VSD is the score-distillation core (:mod:`text3d.guidance.core`) with a LoRA score network on the
teacher's own UNet (:class:`~text3d.guidance.lora.LoRAScoreNetwork`) as the baseline branch, conditioned
on the camera (the flattened camera-to-world matrix) through its timestep embedding; in image space the
baseline is the LoRA's decoded x0, with ``relative_baseline`` (the preset's) taken relative to the decode of the
render's own latents, ``render + D(x0_LoRA) - D(E(render))``, so that the VAE's round-trip error is no colour bias
(:mod:`text3d.guidance.core`). After every 3D step, :meth:`VSDGuidance.update` trains the LoRA on
the detached latents of that step's renders with :func:`~text3d.guidance.lora.lora_training_step`, the
same step that trains the 2D fake score.

``fused_lora`` (off by default) trains the LoRA on the guidance's own draw instead of a fresh one: the LoRA's
prediction ``f(x_t, t, c)`` that the gradient needs is made once, with a graph, and the same output gives its
diffusion loss ``||f(x_t, t, c) - target(x, eps, t)||^2`` at that ``(x_t, t, eps)``, backpropagated and stepped at
once (the gradient uses the output made before the LoRA's step, as the unfused order does). That is one UNet forward per step fewer (the step's LoRA cost goes from prediction + forward +
backward to forward + backward; at SD 2.1-base size on a shared CPU it has not yet been measured faster,
docs/benchmarks.md), at the price of the LoRA's training timesteps following the guidance's
schedule (``t_min``..``t_max``, annealed) instead of ``U[lora.t_min, lora.t_max)``. It applies in latent and
image space (where the prediction is then decoded to the baseline's x0) with ``lora_guidance_scale = 1``; a step whose camera condition is dropped (``camera_drop``) runs unfused, so
the drop keeps its rate; ``lora.steps - 1`` further steps are ordinary ones.

``lora_interval = k`` (1 by default) trains the LoRA on one step in ``k`` only (the first, then every k-th); on
the others its prediction is made without a graph and :meth:`VSDGuidance.update` does nothing. On the embedded
teacher the UNet is call-bound (a batch of 1 costs two thirds of the CFG batch of 2), so the LoRA's forward and
backward make up most of what a VSD step adds to an SDS step; ``k = 3`` (the preset's) brings a step from about 2
SDS steps to about 1.55, and the LoRA then has a third of the steps to follow the renders (docs/guidance.md,
2026-12-07: the 24-prompt table within one seed's spread of ``k = 1``).

``sds_warmup = w`` (0 by default) makes the first fraction ``w`` of the run SDS: the baseline branch is the
injected noise (latent space) or the render itself (image space) while the LoRA still trains on every step's
renders, so when VSD's baseline takes over it predicts the renders it has been fitting instead of starting as the
teacher's own conditional prediction (with which ``grad = x0_cond - x0_CFG`` ignores the render altogether, and
with one particle nothing anchors the asset's colour; docs/guidance.md, 2026-12-05). With one particle, a
LoRA that fits its camera's render exactly and ``relative_baseline``, VSD's image-space gradient *is* SDS's
``render - x0_CFG`` (without it, ``D(E(render)) - x0_CFG``), so the warm-up starts VSD from the point it tends to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from text3d.cameras import CAMERA_FEATURES, camera_features
from text3d.guidance.core import GuidanceOutput, ScoreConfig, ScoreDistillation
from text3d.guidance.lora import LoRAScoreConfig, LoRAScoreNetwork, lora_training_step
from text3d.utils.backends import fused_optimizer_kwargs

if TYPE_CHECKING:
    from text3d.cameras import Cameras
    from text3d.teacher.teacher import Teacher

CAMERA_DIM = CAMERA_FEATURES  # flattened 4x4 camera-to-world matrix


@dataclass
class VSDConfig(ScoreConfig):
    guidance_scale: float = 7.5
    fused_lora: bool = False  # train the LoRA on the guidance's own draw (module docstring): one UNet forward less
    sds_warmup: float = 0.0  # fraction of the run guided as SDS while the LoRA already trains (module docstring)
    lora_interval: int = 1  # the LoRA trains on one step in every ``lora_interval`` (module docstring)
    lora: LoRAScoreConfig = field(default_factory=lambda: LoRAScoreConfig(
        rank=4, alpha=4.0, lr=1e-4, steps=1, camera_condition=True, camera_drop=0.1))


class VSDGuidance(ScoreDistillation):
    """VSD against a frozen teacher, with a trainable camera-conditioned LoRA score network."""

    def __init__(self, teacher: Teacher, cfg: VSDConfig, negative_prompt: str = ""):
        lora_cfg = cfg.lora
        lora = LoRAScoreNetwork(teacher, rank=lora_cfg.rank, alpha=lora_cfg.alpha,
                                condition_dim=CAMERA_DIM if lora_cfg.camera_condition else 0,
                                condition_hidden=lora_cfg.camera_hidden, teacher_camera=lora_cfg.teacher_camera)
        super().__init__(teacher, cfg, lora=lora, negative_prompt=negative_prompt)
        self.optimizer = torch.optim.AdamW(lora.trainable_parameters(), lr=lora_cfg.lr, weight_decay=0.0,
                                           **fused_optimizer_kwargs(teacher.device))
        self.steps_taken = 0  # update() calls so far: the steps whose LoRA trains follow from it (lora_interval)

    @property
    def lora_trains(self) -> bool:
        """Whether this step's :meth:`update` (and a fused :meth:`guide`) trains the LoRA."""
        return self.steps_taken % self.cfg.lora_interval == 0

    def condition(self, cameras: Cameras | None, batch: int) -> torch.Tensor | None:
        """The camera features the LoRA is conditioned on (zeros without cameras; None if unconditioned)."""
        if self.lora.condition_mlp is None:
            return None
        if cameras is None:
            return torch.zeros(batch, CAMERA_DIM, device=self.teacher.device)
        return camera_features(cameras).to(self.teacher.device)

    def guide(self, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, progress: float = 0.0,
              image: torch.Tensor | None = None, condition: torch.Tensor | None = None, negatives=(),
              negative_weights: torch.Tensor | None = None, t: torch.Tensor | None = None,
              noise: torch.Tensor | None = None) -> GuidanceOutput:
        """The core's :meth:`~text3d.guidance.core.ScoreDistillation.guide`; with ``fused_lora`` the LoRA's
        prediction is also its training step (module docstring)."""
        cfg = self.cfg
        if progress < cfg.sds_warmup:  # SDS's baseline; update() still trains the LoRA on this step's renders
            network, self.lora = self.lora, None
            try:
                return super().guide(latents, cond, uncond, progress, image, None, negatives, negative_weights, t,
                                     noise)
            finally:
                self.lora = network
        fusable = (cfg.fused_lora and self.lora_trains and cfg.lora_guidance_scale == 1.0
                   and cfg.lora.steps >= 1 and not cfg.lora.alpha_weighted and cfg.lora.null_prompt_prob == 0.0)
        if fusable:
            batch = latents.shape[0]
            t = self.schedule.sample(batch, progress, device=latents.device) if t is None else t.to(latents.device)
            if noise is None:
                noise = self.draw_noise(latents, t, cond, progress)
            if condition is not None and cfg.lora.camera_drop > 0:
                fusable = bool((torch.rand(batch) >= cfg.lora.camera_drop).all())  # a dropped condition: unfused
        if not fusable:
            return super().guide(latents, cond, uncond, progress, image, condition, negatives, negative_weights, t,
                                 noise)
        network = self.lora
        self.lora = _FusedLoRAStep(self, network, latents.detach().float(), noise)
        try:
            out = super().guide(latents, cond, uncond, progress, image, condition, negatives, negative_weights, t,
                                noise)
        finally:
            self._fused_loss, self.lora = self.lora.loss, network
        return out

    def update(self, output: GuidanceOutput, prompts: Sequence[str], cameras: Cameras | None = None) -> dict[str, float]:
        """``lora.steps`` diffusion-loss steps of the LoRA on the detached latents of this step (the first of
        them already taken inside :meth:`guide` with ``fused_lora``); none on the steps ``lora_interval`` skips."""
        trains, self.steps_taken = self.lora_trains, self.steps_taken + 1
        if not trains:
            return {}
        latents = output.latents.detach().float()
        cond = self.teacher.encode_prompts(list(prompts))
        losses = []
        fused, self._fused_loss = getattr(self, "_fused_loss", None), None
        if fused is not None:
            losses.append(fused)
        for _ in range(self.cfg.lora.steps - (fused is not None)):
            with self.teacher.viewing(cameras):  # the LoRA adapts the UNet as the real branch runs it
                loss = lora_training_step(self.lora, self.optimizer, latents, cond, self.cfg.lora,
                                          condition=self.condition(cameras, latents.shape[0]))
            losses.append(float(loss.detach()) if torch.isfinite(loss) else float("nan"))
        return {"lora_loss": sum(losses) / len(losses)} if losses else {}

    def state_dict(self) -> dict:
        return {"lora": self.lora.lora_state_dict(), "optimizer": self.optimizer.state_dict(), "steps": self.steps_taken}

    def load_state_dict(self, state: dict) -> None:
        self.lora.load_lora_state_dict(state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_taken = int(state.get("steps", 0))  # checkpoints before lora_interval: 0


class _FusedLoRAStep:
    """Stands in for the LoRA network during one fused :meth:`VSDGuidance.guide`: its ``predict_eps`` runs the
    adapted UNet with a graph, takes the LoRA's training step on that output (target from the clean latents and
    the step's noise) and returns the prediction made before the step, detached."""

    def __init__(self, vsd: VSDGuidance, network: LoRAScoreNetwork, latents: torch.Tensor, noise: torch.Tensor):
        self.vsd, self.network, self.latents, self.noise = vsd, network, latents, noise
        self.loss: float | None = None

    def predict_eps(self, latents_noisy, t, embeddings, condition=None, uncond_embeddings=None,
                    guidance_scale: float = 1.0) -> torch.Tensor:
        from text3d.guidance.lora import optimizer_step

        teacher = self.network.teacher
        with torch.enable_grad():
            out = self.network.raw_output(latents_noisy, t, embeddings, condition)
            target = self.network.target(self.latents, self.noise, t)
            loss = (out - target).pow(2).flatten(1).mean(dim=1).mean()
        eps = teacher.to_eps(out.detach(), latents_noisy, t)
        optimizer_step(self.vsd.optimizer, loss)  # non-finite: skipped, reported as NaN
        self.loss = float(loss.detach()) if torch.isfinite(loss) else float("nan")
        return eps
