"""Score Distillation Sampling (DreamFusion): grad = w(t) * (eps_hat - eps), w(t) = 1 - alpha_bar_t.

The gradient is injected with the target trick: ``loss = 0.5 * ||latents - (latents - grad).detach()||^2``
summed over elements, so ``d loss / d latents == grad`` exactly for every sample. CFG uses the
project's one formula, :func:`text3d.teacher.teacher.apply_cfg`; with ``perp_neg > 0`` the other azimuth
views' prompts ("a red car, side view" for a front camera) are negatives whose parts orthogonal to the
positive direction are removed from it (Perp-Neg, :func:`text3d.teacher.teacher.apply_perp_neg`), against
multi-face (Janus) assets.

``space`` says where the guided prediction is formed and the gradient applied:

* ``latent`` (DreamFusion): CFG on the noise predictions, gradient on the VAE latents, back through
  the encoder.
* ``image``: each branch's x0 prediction is decoded, CFG is applied to the two decoded images, and
  the gradient ``baseline_image - clamp(target, 0, 1)`` goes straight to the pixels (no encoder
  backward). A VAE whose latent space is not linear in colour (the embedded teacher's: 1.5x the red
  cube's latent offset decodes brown, 2x green) turns CFG's latent extrapolation into hue shifts;
  extrapolating decoded images does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from text3d.guidance.schedules import TimestepSchedule
from text3d.prompts import other_view_prompts
from text3d.teacher.sampling import predict_x0
from text3d.teacher.teacher import apply_perp_neg


@dataclass
class SDSConfig:
    guidance_scale: float = 100.0
    t_min: float = 0.02
    t_max: float = 0.98
    t_anneal: str = "none"  # none | linear | sqrt | cosine: t_max -> t_max_end over the run
    t_max_end: Optional[float] = None
    t_anneal_start: float = 0.0  # fraction of the run before annealing starts
    grad_clip: Optional[float] = None  # clamp each gradient element to [-grad_clip, grad_clip]
    space: str = "latent"  # latent | image: where CFG is applied and the gradient injected (module docstring)
    image_weight: float = 1.0  # image space: the gradient is image_weight * (baseline_image - target)
    perp_neg: float = 0.0  # Perp-Neg: weight of each other azimuth view's prompt as a negative (0 = plain CFG)


@dataclass
class GuidanceOutput:
    loss: torch.Tensor  # scalar; backward() sends ``grad`` into the latents (image space: the pixels)
    grad: torch.Tensor  # [B, C, h, w] (image space: [B, 3, H, W]), detached
    t: torch.Tensor  # [B] integer timesteps
    latents: torch.Tensor  # [B, C, h, w], attached to the image graph in latent space, detached in image space
    nonfinite: int  # gradient elements that were NaN/inf and were zeroed

    @property
    def grad_norm(self) -> float:
        return float(self.grad.flatten(1).norm(dim=1).mean())


def target_trick_loss(latents: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient with respect to ``latents`` is exactly ``grad``."""
    target = (latents - grad).detach()
    return 0.5 * (latents - target).pow(2).sum()


def sanitize_grad(grad: torch.Tensor, clip: float | None) -> tuple[torch.Tensor, int]:
    """Zero NaN/inf elements (returning how many) and optionally clamp."""
    finite = torch.isfinite(grad)
    nonfinite = int((~finite).sum())
    if nonfinite:
        grad = torch.where(finite, grad, torch.zeros_like(grad))
    if clip is not None:
        grad = grad.clamp(-clip, clip)
    return grad, nonfinite


class SDSGuidance:
    """SDS against a frozen :class:`~text3d.teacher.teacher.Teacher`.

    Subclasses change what the guided prediction is compared with (:meth:`baseline_eps`) and may
    carry trainable state of their own (:meth:`update`, :meth:`state_dict`); SDS has none.
    """

    def __init__(self, teacher, cfg: SDSConfig, negative_prompt: str = ""):
        self.teacher, self.cfg, self.negative_prompt = teacher, cfg, negative_prompt
        self.schedule = TimestepSchedule(teacher.num_train_timesteps, cfg.t_min, cfg.t_max, cfg.t_anneal,
                                         cfg.t_max_end, cfg.t_anneal_start)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) = 1 - alpha_bar_t, shaped [B, 1, 1, 1]."""
        return 1.0 - self.teacher.alpha_bar(t)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], progress: float = 0.0, cameras=None,
                 t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> GuidanceOutput:
        """The gradient for rendered ``images`` [B, 3, H, W] in [0, 1], one prompt per image."""
        if self.cfg.space == "image":
            return self.guide_image(images, prompts, progress, cameras=cameras, t=t, noise=noise)
        latents = self.teacher.encode_images(images)
        return self.guide_latents(latents, prompts, progress, cameras=cameras, t=t, noise=noise)

    def baseline_image(self, images: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                       cond: torch.Tensor, cameras=None) -> torch.Tensor:
        """Image space: what the guided image is compared with. SDS: the (resized, detached) image itself."""
        return images

    def baseline_eps(self, noisy: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor,
                     cameras=None) -> torch.Tensor:
        """What the teacher's guided prediction is compared with: SDS uses the injected noise itself."""
        return noise

    def guide_latents(self, latents: torch.Tensor, prompts: Sequence[str], progress: float = 0.0, cameras=None,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> GuidanceOutput:
        batch = latents.shape[0]
        if len(prompts) != batch:
            raise ValueError(f"{len(prompts)} prompts for {batch} images")
        t, noise = self._draw(latents, batch, progress, t, noise)
        cond = self.teacher.encode_prompts(list(prompts))
        uncond = self.teacher.encode_prompts([self.negative_prompt] * batch)
        negatives, weights = self.perp_negatives(prompts)
        with torch.no_grad():
            noisy = self.teacher.add_noise(latents.detach().float(), noise, t)
            if negatives:
                eps = self.teacher.predict_eps_many(noisy, t, [uncond, cond] + negatives)
                eps_hat = apply_perp_neg(eps[0], eps[1], eps[2:], weights, self.cfg.guidance_scale)
            else:
                eps_hat = self.teacher.predict_eps(noisy, t, cond, uncond, guidance_scale=self.cfg.guidance_scale)
            grad = self.weight(t) * (eps_hat - self.baseline_eps(noisy, t, noise, cond, cameras))
        grad, nonfinite = sanitize_grad(grad, self.cfg.grad_clip)
        return GuidanceOutput(target_trick_loss(latents.float(), grad), grad, t, latents, nonfinite)

    def perp_negatives(self, prompts: Sequence[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Perp-Neg's negatives: K embedding batches (the k-th other azimuth view of each prompt) and their
        weights [K, B]; ``([], empty)`` when ``perp_neg`` is 0 or no prompt has a view suffix. A prompt with
        fewer negatives (plain, overhead) repeats itself there with weight 0, which changes nothing."""
        w = float(self.cfg.perp_neg)
        others = [other_view_prompts(p) for p in prompts] if w != 0.0 else []
        k = max((len(o) for o in others), default=0)
        if k == 0:
            return [], torch.zeros(0, len(prompts))
        texts = [[o[i] if i < len(o) else p for o, p in zip(others, prompts)] for i in range(k)]
        weights = torch.tensor([[w if i < len(o) else 0.0 for o in others] for i in range(k)])
        return [self.teacher.encode_prompts(batch) for batch in texts], weights

    def _draw(self, latents: torch.Tensor, batch: int, progress: float, t, noise):
        if t is None:
            t = self.schedule.sample(batch, progress, device=latents.device)
        if noise is None:
            noise = torch.randn(latents.shape, dtype=torch.float32).to(latents.device)
        return t, noise

    def guide_image(self, images: torch.Tensor, prompts: Sequence[str], progress: float = 0.0, cameras=None,
                    t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> GuidanceOutput:
        """Image-space SDS: grad on the pixels = image_weight * (baseline_image - clamp(CFG(decoded x0s), 0, 1))."""
        teacher, batch = self.teacher, images.shape[0]
        if len(prompts) != batch:
            raise ValueError(f"{len(prompts)} prompts for {batch} images")
        pixels = teacher.resize_images(images).float()
        with torch.no_grad():
            latents = teacher.encode_images(pixels.detach())
        t, noise = self._draw(latents, batch, progress, t, noise)
        cond = teacher.encode_prompts(list(prompts))
        uncond = teacher.encode_prompts([self.negative_prompt] * batch)
        negatives, weights = self.perp_negatives(prompts)
        with torch.no_grad():
            noisy = teacher.add_noise(latents, noise, t)
            eps = teacher.predict_eps_many(noisy, t, [uncond, cond] + negatives)
            images = [teacher.decode_latents(predict_x0(teacher, noisy, e, t)) for e in eps]
            target = apply_perp_neg(images[0], images[1], images[2:], weights, self.cfg.guidance_scale).clamp(0.0, 1.0)
            base = self.baseline_image(pixels.detach(), noisy, t, noise, cond, cameras)
            grad = self.cfg.image_weight * (base - target)
        grad, nonfinite = sanitize_grad(grad, self.cfg.grad_clip)
        return GuidanceOutput(target_trick_loss(pixels, grad), grad, t, latents, nonfinite)

    # trainable state (none for SDS)
    def update(self, output: GuidanceOutput, prompts: Sequence[str], cameras=None) -> dict[str, float]:
        """Called once per 3D step after the asset's update, with that step's guidance output."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise RuntimeError(f"SDS guidance has no state, got keys {sorted(state)[:3]}")
