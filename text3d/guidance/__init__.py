"""Score-distillation guidance: gradients for images from a frozen diffusion teacher.

  core.py       the one score-distillation gradient (SDS, VSD, SwiftBrush, DMD, DMD2 are configurations)
  schedules.py  the timestep schedule t ~ U[t_min, t_max(progress)] * T
  lora.py       the LoRA score network on the teacher's UNet and its one training step
  sds.py, vsd.py  the 3D methods: the core with the noise or the camera-conditioned LoRA as baseline

A guidance object sees only images (or latents), cameras and prompts -- never a renderer's insides --
so the same object can drive a NeRF, a mesh or a 2D student.
"""

from text3d.guidance.core import (GuidanceOutput, ScoreConfig, ScoreDistillation, check_score_config, sanitize_grad,
                                  score_gradient, target_trick_loss)
from text3d.guidance.lora import LoRAScoreConfig, LoRAScoreNetwork, check_lora_config, lora_training_step
from text3d.guidance.schedules import TimestepSchedule
from text3d.guidance.sds import SDSConfig, SDSGuidance
from text3d.guidance.vsd import VSDConfig, VSDGuidance

__all__ = ["GuidanceOutput", "LoRAScoreConfig", "LoRAScoreNetwork", "SDSConfig", "SDSGuidance", "ScoreConfig",
           "ScoreDistillation", "TimestepSchedule", "VSDConfig", "VSDGuidance", "check_lora_config",
           "check_score_config", "lora_training_step", "sanitize_grad", "score_gradient", "target_trick_loss"]
