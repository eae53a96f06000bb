"""The one score-difference gradient behind SwiftBrush, DMD and DMD2 (and, in 3D, VSD).

For a generated latent x (the student's x0, attached to its graph), noise it to x_t at
t ~ U[t_min, t_max] * T, then compare the frozen teacher ("real score", CFG ``real_guidance_scale``)
with the LoRA on the teacher's weights ("fake score", CFG ``fake_guidance_scale``; 1 = conditional):

* ``sigma2`` (SwiftBrush, VSD): grad = (1 - ab_t) * (eps_real - eps_fake)
* ``dmd`` (DMD, DMD2):          grad = (x0_fake - x0_real) / mean|x - x0_real|  (mean per sample)

The gradient is sanitised (NaN/inf zeroed, optional clamp) and injected with the target trick; with
``reduction = "sum"`` d loss / d x is exactly ``grad``, with ``"mean"`` it is ``grad / x.numel()``.

With ``space = "image"`` (as :mod:`text3d.guidance.sds`'s image space) the x0 predictions of both
branches are decoded, each branch's CFG is applied to its decoded images, and the gradient is formed
on the decoded student image ``D(x)`` and sent back through the decoder into x:
``sigma2``: grad = D(x0_fake) - clamp(D_cfg(x0_real)); ``dmd``: the same divided by mean|D(x) - D_cfg(x0_real)|.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from text3d.guidance.sds import sanitize_grad, target_trick_loss
from text3d.teacher.sampling import predict_x0
from text3d.teacher.teacher import apply_cfg


@dataclass
class ScoreDifference:
    loss: torch.Tensor
    grad: torch.Tensor
    t: torch.Tensor
    nonfinite: int


class ScoreDifferenceCore:
    """``core(x, cond, uncond)`` -> :class:`ScoreDifference`; ``cfg`` is a ScoreCoreConfig."""

    def __init__(self, teacher, fake, cfg):
        self.teacher, self.fake, self.cfg = teacher, fake, cfg

    def sample_t(self, batch: int) -> torch.Tensor:
        T = self.teacher.num_train_timesteps
        lo = int(round(self.cfg.t_min * (T - 1)))
        hi = max(lo, int(round(self.cfg.t_max * (T - 1))))
        return torch.randint(lo, hi + 1, (batch,)).to(self.teacher.device)

    def gradient(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, t: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(grad, t) for latents ``x`` (no graph)."""
        cfg, teacher = self.cfg, self.teacher
        batch = x.shape[0]
        t = self.sample_t(batch) if t is None else t.to(teacher.device)
        noise = torch.randn(x.shape, dtype=torch.float32).to(x.device) if noise is None else noise
        with torch.no_grad():
            x = x.detach().float()
            noisy = teacher.add_noise(x, noise, t)
            eps_real = teacher.predict_eps(noisy, t, cond, uncond, guidance_scale=cfg.real_guidance_scale)
            eps_fake = self.fake.predict_eps(noisy, t, cond, uncond_embeddings=uncond,
                                             guidance_scale=cfg.fake_guidance_scale)
            if cfg.weighting == "sigma2":
                grad = (1.0 - teacher.alpha_bar(t)) * (eps_real - eps_fake)
            elif cfg.weighting == "dmd":
                x0_real = predict_x0(teacher, noisy, eps_real, t)
                x0_fake = predict_x0(teacher, noisy, eps_fake, t)
                scale = (x - x0_real).abs().flatten(1).mean(dim=1).clamp_min(1e-8).view(-1, 1, 1, 1)
                grad = (x0_fake - x0_real) / scale
            else:
                raise ValueError(f"unknown weighting {cfg.weighting!r}")
        return grad, t

    def _decoded_cfg(self, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                     scale: float, fake: bool) -> torch.Tensor:
        """clamp(CFG of the decoded x0 predictions of one branch, 0, 1) (scale 1: the conditional one only)."""
        teacher = self.teacher

        def decoded(eps):
            return teacher.decode_latents(predict_x0(teacher, noisy, eps, t))

        with self.fake.active() if fake else contextlib.nullcontext():  # the fake score: adapters on
            if scale == 1.0:
                return decoded(teacher.predict_eps(noisy, t, cond))
            eps_u, eps_c = teacher.predict_eps_branches(noisy, t, cond, uncond)
        return apply_cfg(decoded(eps_u), decoded(eps_c), scale).clamp(0.0, 1.0)

    def image_gradient(self, x: torch.Tensor, image: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                       t: torch.Tensor | None = None, noise: torch.Tensor | None = None):
        """(grad on the decoded image, t) for latents ``x`` whose decoding is ``image`` (no graph)."""
        cfg, teacher = self.cfg, self.teacher
        t = self.sample_t(x.shape[0]) if t is None else t.to(teacher.device)
        noise = torch.randn(x.shape, dtype=torch.float32).to(x.device) if noise is None else noise
        with torch.no_grad():
            noisy = teacher.add_noise(x.detach().float(), noise, t)
            real = self._decoded_cfg(noisy, t, cond, uncond, cfg.real_guidance_scale, fake=False)
            fake = self._decoded_cfg(noisy, t, cond, uncond, cfg.fake_guidance_scale, fake=True)
            grad = fake - real
            if cfg.weighting == "dmd":
                grad = grad / (image.detach() - real).abs().flatten(1).mean(dim=1).clamp_min(1e-8).view(-1, 1, 1, 1)
            elif cfg.weighting != "sigma2":
                raise ValueError(f"unknown weighting {cfg.weighting!r}")
        return grad, t

    def __call__(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, t: torch.Tensor | None = None,
                 noise: torch.Tensor | None = None) -> ScoreDifference:
        if self.cfg.space == "image":
            target = self.teacher.decode_latents(x.float(), clamp=False)
            grad, t = self.image_gradient(x, target, cond, uncond, t, noise)
        else:
            target = x.float()
            grad, t = self.gradient(x, cond, uncond, t, noise)
        grad, nonfinite = sanitize_grad(grad, self.cfg.grad_clip)
        loss = target_trick_loss(target, grad)
        if self.cfg.reduction == "mean":
            loss = loss / target.numel()
        return ScoreDifference(loss, grad, t, nonfinite)
