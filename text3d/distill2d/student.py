"""The student: a trainable copy of the teacher's UNet that maps noise to x0 in one call per timestep.

x0 comes from the UNet's output at a fixed conditioning timestep t through the teacher's own
prediction type and ``alphas_cumprod`` (never a hard-coded alpha): for an epsilon model,
``x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)``. A one-step student runs at ``timesteps = [999]``
on pure noise; a multi-step student (DMD2) runs at e.g. 999/749/499/249, re-noising its x0 to the
next timestep in between. The saved student is a complete Stable Diffusion folder (the teacher's
VAE, text encoder, tokenizer and scheduler plus the student UNet) with a ``student.json`` that
tells `text3d sample` its timesteps, sampler and guidance scale.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Sequence

import torch

from text3d.teacher.sampling import predict_x0

STUDENT_CARD = "student.json"


class Student(torch.nn.Module):
    """``unet`` (trainable, fp32) plus the teacher it was copied from (for alpha_bar and conversions)."""

    def __init__(self, teacher, timesteps: Sequence[int] = (999,), unet=None):
        super().__init__()
        if unet is None:
            from text3d.teacher.loader import quiet_hf

            with quiet_hf():
                unet = copy.deepcopy(teacher.unet).to(teacher.device, torch.float32)
        self.unet = unet
        if any("lora_" in name for name, _ in self.unet.named_parameters()):
            raise ValueError("build the student before adding LoRA adapters to the teacher's UNet")
        self.unet.requires_grad_(True)
        self.unet.train()
        self.timesteps = [int(t) for t in timesteps]
        self._teacher = [teacher]  # a list: not a submodule, not in state_dict

    @property
    def teacher(self):
        return self._teacher[0]

    def x0(self, x_t: torch.Tensor, t: int | torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """The student's x0 prediction [B, C, h, w] (float32) from x_t at timestep t."""
        teacher = self.teacher
        t = torch.as_tensor(t, device=teacher.device).long().reshape(-1).expand(x_t.shape[0])
        cameras = {"class_labels": teacher.camera_labels(x_t.shape[0]).float()} if teacher.camera_dim else {}
        out = self.unet(x_t.to(teacher.device, torch.float32), t, encoder_hidden_states=embeddings.float(),
                        return_dict=False, **cameras)[0].float()  # a view-aware teacher's copy: "no camera"
        if out.shape[1] == 2 * teacher.latent_channels:
            out = out[:, : teacher.latent_channels]
        if teacher.prediction_type == "sample":
            return out
        eps = teacher.to_eps(out, x_t, t)
        return predict_x0(teacher, x_t, eps, t)

    def renoise(self, x0: torch.Tensor, k: int, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x0 noised to the student's timestep ``k`` (its input for step k)."""
        noise = torch.randn(x0.shape, dtype=torch.float32).to(x0.device) if noise is None else noise
        t = torch.full((x0.shape[0],), self.timesteps[k], device=x0.device, dtype=torch.long)
        return self.teacher.add_noise(x0.float(), noise, t)

    def generate(self, z: torch.Tensor, embeddings: torch.Tensor, steps: int | None = None,
                 grad_last: bool = False) -> torch.Tensor:
        """x0 from noise ``z`` with the first ``steps`` timesteps (default all); only the last call keeps
        gradients when ``grad_last`` (backward simulation runs the earlier calls without them)."""
        steps = len(self.timesteps) if steps is None else steps
        x = z
        for k in range(steps):
            last = k == steps - 1
            with torch.set_grad_enabled(grad_last and last and torch.is_grad_enabled()):
                x0 = self.x0(x, self.timesteps[k], embeddings)
            if not last:
                x = self.renoise(x0.detach(), k + 1)
        return x0


def student_card(timesteps: Sequence[int], method: str, steps_trained: int, teacher_source: str) -> dict:
    return {"kind": "text3d one-step student" if len(timesteps) == 1 else "text3d few-step student",
            "method": method, "timesteps": [int(t) for t in timesteps], "sampler": "renoise",
            "guidance_scale": 1.0, "steps_trained": int(steps_trained), "teacher": str(teacher_source)}


def save_student(out: str | os.PathLike, unet, teacher, card: dict) -> Path:
    """Write a complete SD folder (the student UNet with the teacher's other components) atomically."""
    return teacher.save_pretrained(out, unet=unet, extra_files={STUDENT_CARD: json.dumps(card, indent=2) + "\n"})


def read_student_card(folder: str | os.PathLike | None) -> dict | None:
    """The ``student.json`` of a saved student folder, or None for a plain teacher."""
    if folder is None:
        return None
    path = Path(folder) / STUDENT_CARD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
