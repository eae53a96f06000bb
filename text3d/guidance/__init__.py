"""Score-distillation guidance: gradients for images from a frozen diffusion teacher.

A guidance object sees only images, cameras and prompts -- never a renderer's insides -- so the
same object can drive a NeRF, a mesh or a 2D student.
"""

from text3d.guidance.schedules import TimestepSchedule
from text3d.guidance.sds import GuidanceOutput, SDSConfig, SDSGuidance, target_trick_loss
from text3d.guidance.vsd import VSDConfig, VSDGuidance

__all__ = ["GuidanceOutput", "SDSConfig", "SDSGuidance", "TimestepSchedule", "VSDConfig", "VSDGuidance",
           "target_trick_loss"]
