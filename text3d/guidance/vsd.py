"""Variational Score Distillation (ProlificDreamer): grad = w(t) * (eps_hat_teacher^CFG - eps_hat_LoRA(c)).

The particles' rendered distribution is modelled by a LoRA score network on the teacher's own
UNet (:class:`~text3d.guidance.lora.LoRAScoreNetwork`), conditioned on the camera (flattened
camera-to-world matrix) through its timestep embedding. Everything else -- the timestep
schedule, CFG formula, NaN guard, clipping and the target-trick loss -- is SDS's, inherited from
:class:`~text3d.guidance.sds.SDSGuidance`; only the baseline that the guided prediction is
compared with changes (in image space, :meth:`VSDGuidance.baseline_image`). After every 3D step,
:meth:`VSDGuidance.update` trains the LoRA on the detached latents of that step's renders with the
teacher's own diffusion loss at t ~ U[0, T).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from text3d.guidance.lora import LoRAScoreNetwork
from text3d.guidance.sds import GuidanceOutput, SDSConfig, SDSGuidance
from text3d.teacher.sampling import predict_x0

CAMERA_DIM = 16  # flattened 4x4 camera-to-world matrix


@dataclass
class VSDConfig(SDSConfig):
    guidance_scale: float = 7.5
    lora_rank: int = 4
    lora_alpha: float = 4.0  # LoRA scale is alpha / rank
    lora_lr: float = 1e-4
    lora_steps: int = 1  # LoRA updates per 3D step
    lora_t_min: float = 0.0  # LoRA training timesteps ~ U[lora_t_min, lora_t_max) * T
    lora_t_max: float = 1.0
    camera_condition: bool = True
    camera_drop: float = 0.1  # fraction of LoRA training samples whose camera is zeroed
    camera_hidden: int = 64


def camera_features(cameras) -> torch.Tensor:
    """[B, 16]: the flattened camera-to-world matrices."""
    return cameras.c2w.reshape(cameras.c2w.shape[0], -1).float()


class VSDGuidance(SDSGuidance):
    """VSD against a frozen teacher, with a trainable camera-conditioned LoRA score network."""

    def __init__(self, teacher, cfg: VSDConfig, negative_prompt: str = ""):
        super().__init__(teacher, cfg, negative_prompt)
        self.lora = LoRAScoreNetwork(teacher, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                                     condition_dim=CAMERA_DIM if cfg.camera_condition else 0,
                                     condition_hidden=cfg.camera_hidden)
        self.optimizer = torch.optim.AdamW(self.lora.trainable_parameters(), lr=cfg.lora_lr, weight_decay=0.0)

    def _condition(self, cameras, batch: int) -> torch.Tensor | None:
        if self.lora.condition_mlp is None:
            return None
        if cameras is None:
            return torch.zeros(batch, CAMERA_DIM, device=self.teacher.device)
        return camera_features(cameras).to(self.teacher.device)

    def baseline_eps(self, noisy, t, noise, cond, cameras=None) -> torch.Tensor:
        """The LoRA network's conditional noise prediction for the same noisy latents and camera."""
        return self.lora.predict_eps(noisy, t, cond, self._condition(cameras, noisy.shape[0]))

    def baseline_image(self, images, noisy, t, noise, cond, cameras=None) -> torch.Tensor:
        """Image space: the decoded x0 of the LoRA network's prediction (the renders' own score)."""
        eps = self.baseline_eps(noisy, t, noise, cond, cameras)
        return self.teacher.decode_latents(predict_x0(self.teacher, noisy, eps, t))

    def update(self, output: GuidanceOutput, prompts: Sequence[str], cameras=None) -> dict[str, float]:
        """``lora_steps`` diffusion-loss steps of the LoRA on the detached latents of this step."""
        cfg = self.cfg
        latents = output.latents.detach().float()
        batch = latents.shape[0]
        cond = self.teacher.encode_prompts(list(prompts))
        T = self.teacher.num_train_timesteps
        lo = int(cfg.lora_t_min * T)
        hi = max(lo + 1, int(cfg.lora_t_max * T))
        losses = []
        for _ in range(cfg.lora_steps):
            t = torch.randint(lo, hi, (batch,)).to(self.teacher.device)
            noise = torch.randn(latents.shape, dtype=torch.float32).to(latents.device)
            condition = self._condition(cameras, batch)
            if condition is not None and cfg.camera_drop > 0:
                keep = (torch.rand(batch) >= cfg.camera_drop).float().to(condition.device)
                condition = condition * keep[:, None]
            loss = self.lora.denoising_loss(latents, cond, t, noise, condition)
            self.optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                losses.append(float("nan"))
                continue
            loss.backward()
            self.optimizer.step()
            losses.append(float(loss.detach()))
        return {"lora_loss": sum(losses) / len(losses)}

    def state_dict(self) -> dict:
        return {"lora": self.lora.lora_state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.lora.load_lora_state_dict(state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
