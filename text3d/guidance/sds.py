"""Score Distillation Sampling (DreamFusion): grad = w(t) (eps_hat - eps), w(t) = 1 - alpha_bar_t.

SDS is the score-distillation core (:mod:`text3d.guidance.core`) with the injected noise as the baseline
branch: no trainable state. With ``perp_neg > 0`` the other azimuth views' prompts ("a red car, side view"
for a front camera) are negatives whose parts orthogonal to the positive direction are removed from it
(Perp-Neg), against multi-face (Janus) assets; ``space = "image"`` extrapolates decoded images instead of
latents and sends the gradient straight to the pixels (the core's docstring).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from text3d.guidance.core import GuidanceOutput, ScoreConfig, ScoreDistillation, sanitize_grad, target_trick_loss

if TYPE_CHECKING:
    from text3d.teacher.teacher import Teacher

SDSConfig = ScoreConfig  # SDS's settings are the core's, with its defaults

__all__ = ["GuidanceOutput", "SDSConfig", "SDSGuidance", "sanitize_grad", "target_trick_loss"]


class SDSGuidance(ScoreDistillation):
    """SDS against a frozen :class:`~text3d.teacher.teacher.Teacher`: the core with the noise baseline."""

    def __init__(self, teacher: Teacher, cfg: ScoreConfig, negative_prompt: str = ""):
        super().__init__(teacher, cfg, lora=None, negative_prompt=negative_prompt)
