"""Variational Score Distillation (ProlificDreamer): grad = w(t) (eps_hat_teacher^CFG - eps_hat_LoRA(c)).

VSD is the score-distillation core (:mod:`text3d.guidance.core`) with a LoRA score network on the
teacher's own UNet (:class:`~text3d.guidance.lora.LoRAScoreNetwork`) as the baseline branch, conditioned
on the camera (the flattened camera-to-world matrix) through its timestep embedding; in image space the
baseline is the LoRA's decoded x0. After every 3D step, :meth:`VSDGuidance.update` trains the LoRA on
the detached latents of that step's renders with :func:`~text3d.guidance.lora.lora_training_step`, the
same step that trains the 2D fake score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch

from text3d.cameras import CAMERA_FEATURES, camera_features
from text3d.guidance.core import GuidanceOutput, ScoreConfig, ScoreDistillation
from text3d.guidance.lora import LoRAScoreConfig, LoRAScoreNetwork, lora_training_step

if TYPE_CHECKING:
    from text3d.cameras import Cameras
    from text3d.teacher.teacher import Teacher

CAMERA_DIM = CAMERA_FEATURES  # flattened 4x4 camera-to-world matrix


@dataclass
class VSDConfig(ScoreConfig):
    guidance_scale: float = 7.5
    lora: LoRAScoreConfig = field(default_factory=lambda: LoRAScoreConfig(
        rank=4, alpha=4.0, lr=1e-4, steps=1, camera_condition=True, camera_drop=0.1))


class VSDGuidance(ScoreDistillation):
    """VSD against a frozen teacher, with a trainable camera-conditioned LoRA score network."""

    def __init__(self, teacher: Teacher, cfg: VSDConfig, negative_prompt: str = ""):
        lora_cfg = cfg.lora
        lora = LoRAScoreNetwork(teacher, rank=lora_cfg.rank, alpha=lora_cfg.alpha,
                                condition_dim=CAMERA_DIM if lora_cfg.camera_condition else 0,
                                condition_hidden=lora_cfg.camera_hidden)
        super().__init__(teacher, cfg, lora=lora, negative_prompt=negative_prompt)
        self.optimizer = torch.optim.AdamW(lora.trainable_parameters(), lr=lora_cfg.lr, weight_decay=0.0)

    def condition(self, cameras: Cameras | None, batch: int) -> torch.Tensor | None:
        """The camera features the LoRA is conditioned on (zeros without cameras; None if unconditioned)."""
        if self.lora.condition_mlp is None:
            return None
        if cameras is None:
            return torch.zeros(batch, CAMERA_DIM, device=self.teacher.device)
        return camera_features(cameras).to(self.teacher.device)

    def update(self, output: GuidanceOutput, prompts: Sequence[str], cameras: Cameras | None = None) -> dict[str, float]:
        """``lora.steps`` diffusion-loss steps of the LoRA on the detached latents of this step."""
        latents = output.latents.detach().float()
        cond = self.teacher.encode_prompts(list(prompts))
        losses = []
        for _ in range(self.cfg.lora.steps):
            with self.teacher.viewing(cameras):  # the LoRA adapts the UNet as the real branch runs it
                loss = lora_training_step(self.lora, self.optimizer, latents, cond, self.cfg.lora,
                                          condition=self.condition(cameras, latents.shape[0]))
            losses.append(float(loss.detach()) if torch.isfinite(loss) else float("nan"))
        return {"lora_loss": sum(losses) / len(losses)} if losses else {}

    def state_dict(self) -> dict:
        return {"lora": self.lora.lora_state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.lora.load_lora_state_dict(state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
