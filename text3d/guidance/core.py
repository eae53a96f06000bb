"""The one score-distillation gradient: SDS, VSD, SwiftBrush, DMD and DMD2 are configurations of it.

For latents ``x`` of what is being generated (in 3D the VAE latents of a render, in 2D a student's x0),
draw ``t ~ U[t_min, t_max(progress)] * T`` (:class:`~text3d.guidance.schedules.TimestepSchedule`) and
noise ``eps``, and form ``x_t = sqrt(ab_t) x + sqrt(1 - ab_t) eps``. Two branches look at ``x_t``:

* the **real** branch: the frozen teacher with CFG ``guidance_scale`` (the project's one formula,
  :func:`~text3d.teacher.teacher.apply_cfg`; with Perp-Neg negatives,
  :func:`~text3d.teacher.teacher.apply_perp_neg`; with ``cfg_rescale = phi > 0`` each channel's mean and
  standard deviation pulled by ``phi`` towards the conditional prediction's,
  :func:`~text3d.teacher.teacher.rescale_cfg`; with ``camera_cfg`` on a view-aware teacher the
  unconditional prediction sees neither the text nor the camera, so ``s (cond - uncond)`` amplifies the view
  as it amplifies the prompt; with ``camera_guidance = w > 0`` on a view-aware teacher a third prediction, the
  prompt's without the camera, adds ``w (cond - cond_no_camera)``: the view's own direction (the car's lights on
  its front, the house's door) amplified on its own, the prompt's CFG left as it is),
* the **baseline** branch: the injected noise ``eps`` itself (SDS), or a LoRA on the teacher's own UNet
  (:class:`~text3d.guidance.lora.LoRAScoreNetwork`: VSD's variational score, the "fake score" of SwiftBrush,
  DMD and DMD2) with CFG ``lora_guidance_scale`` (1 = conditional only) and an optional condition (VSD's
  camera).

``weighting`` turns the two into a gradient on ``x``:

* ``sigma2`` (DreamFusion, ProlificDreamer, SwiftBrush): ``grad = (1 - ab_t) (eps_real - eps_base)``
* ``dmd`` (DMD, DMD2): ``grad = (x0_base - x0_real) / mean|x - x0_real|`` (the mean per sample)

With ``space = "image"`` each branch's x0 prediction is decoded, the CFG is applied to the decoded images
(extrapolating images keeps hues that a latent space non-linear in colour turns into other colours) and
the gradient is formed on an image ``D``: the render's pixels in 3D, the decoded student ``D(x)`` in 2D:
``grad = image_weight (base - clamp(real, 0, 1))`` with ``base = D`` for the noise baseline and the LoRA's
decoded x0 otherwise; ``dmd`` divides it by ``mean|D - real|``.

``relative_baseline`` (image space with a LoRA) takes the LoRA's baseline relative to the decode of the image's own
latents: ``base = D + D(x0_LoRA) - D(x)``. The LoRA models the latents ``x = E(D)``, so its decoded x0 at best
reproduces ``D(E(D))``, not ``D``; where the VAE's round trip is off in colour (the embedded teacher's, on the
speckled, half-transparent renders of the first few hundred steps, decodes grey and green as pink) that error is a
bias in ``D(x0_LoRA) - real`` that the asset pays for by shifting its colour the other way, while SDS's ``D - real``
does not carry it. With it VSD's gradient is SDS's plus the decoded difference of the LoRA's x0 and the latents,
``D(x0_LoRA) - D(x)`` (a LoRA that fits one render exactly adds nothing); the round trip's error cancels. (In 2D,
where ``D`` is ``D(x)`` unclamped, it would only add ``D``'s part outside [0, 1]; it is meant for 3D.) ``D(x)``
shares the branches' one VAE call.

The gradient is sanitised (NaN/inf zeroed and counted, optional clamp to ``grad_clip``) and injected with
the target trick ``loss = 0.5 ||y - (y - grad).detach()||^2`` on ``y`` (the latents or the image), so
``d loss / d y = grad`` exactly with ``reduction = "sum"`` and ``grad / y.numel()`` with ``"mean"``.

``noise = "inversion"`` (SDI, Lukoianov et al. 2024) replaces the random ``eps`` by the noise that DDIM inversion
of ``x`` finds: ``x_t`` is reached from ``x`` by ``inversion_steps`` deterministic DDIM steps upwards with the teacher's
conditional prediction (the camera included), and ``eps = (x_t - sqrt(ab_t) x) / sqrt(1 - ab_t)``
(:func:`~text3d.teacher.sampling.ddim_invert`). SDS with random noise is a DDIM sampler whose every step starts a
new trajectory, and what it distils is the average over them (small features averaged away); with the inverted
noise each step continues the trajectory through the current ``x``. It costs ``inversion_steps`` conditional UNet
calls a step; ``inversion_from`` keeps the random noise for that first fraction of the run (the shape). With the
embedded teacher it does not work: its inversion of a render finds noise of standard deviation 0.24-0.5 rather
than 1 (the renders are not on its manifold), ``x_t`` is under-noised for its ``t`` and the assets come out as
faint clouds (docs/guidance.md, 2026-12-06); it is there for real SD teachers, where the paper measured it.

``target_steps = K > 1`` (image space) takes the real branch's target several denoising steps down instead of one,
where the teacher draws small features that its one-step prediction averages away (a car's lights at 64 px appear
in the guided x0 after 2-4 DDIM steps from t = 0.5, not after one; docs/guidance.md, 2026-12-07). The steps are
``K t / T`` rounded (at least 1: a fixed step length of ``T / K``), at timesteps ``s_i = round(t (k - i) / k)``; each
but the last decodes the guided x0 at ``s_i`` (image-space CFG, rescaled, clamped), encodes it back to ``x0_i`` and
takes the deterministic DDIM step ``z <- sqrt(ab_{s_{i+1}}) x0_i + sqrt(1 - ab_{s_{i+1}}) (z - sqrt(ab_{s_i}) x0_i) /
sqrt(1 - ab_{s_i})``; the last step's guided image is the target. It costs one CFG pair and a VAE round trip per extra
step; ``target_steps_from`` keeps the one-step target for that first fraction of the run (the shape). The baseline
branch is unchanged (meant for SDS).

Everything goes through :func:`score_gradient`; :class:`ScoreDistillation` draws ``t`` and the noise,
encodes prompts and injects the result. 3D guidance calls it with rendered images and prompts
(:meth:`ScoreDistillation.__call__`), 2D students with latents and embeddings
(:meth:`ScoreDistillation.from_latents`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from text3d.errors import ConfigError
from text3d.guidance.schedules import TimestepSchedule, anneal_fraction
from text3d.prompts import other_view_prompts
from text3d.teacher.sampling import ddim_invert, predict_x0
from text3d.teacher.teacher import apply_perp_neg, rescale_cfg

if TYPE_CHECKING:
    from text3d.cameras import Cameras
    from text3d.guidance.lora import LoRAScoreNetwork
    from text3d.teacher.teacher import Teacher

WEIGHTINGS = ("sigma2", "dmd")
SPACES = ("latent", "image")
NOISES = ("random", "inversion")
REDUCTIONS = ("sum", "mean")


@dataclass
class ScoreConfig:
    """The score-distillation gradient's settings (module docstring); SDS's defaults."""

    guidance_scale: float = 100.0  # CFG of the real branch (the frozen teacher)
    lora_guidance_scale: float = 1.0  # CFG of the LoRA baseline, when there is one (1 = conditional only)
    weighting: str = "sigma2"  # sigma2: (1 - ab_t)(eps_real - eps_base) | dmd: (x0_base - x0_real) / mean|x - x0_real|
    t_min: float = 0.02
    t_max: float = 0.98
    t_anneal: str = "none"  # none | linear | sqrt | cosine: t_max -> t_max_end over the run
    t_max_end: Optional[float] = None
    t_anneal_start: float = 0.0  # fraction of the run before annealing starts
    grad_clip: Optional[float] = None  # clamp each gradient element to [-grad_clip, grad_clip]
    space: str = "latent"  # latent | image: where CFG is applied and the gradient injected (module docstring)
    image_weight: float = 1.0  # image space: the gradient is image_weight * (base - target)
    perp_neg: float = 0.0  # Perp-Neg: weight of each other azimuth view's prompt as a negative (0 = plain CFG)
    cfg_rescale: float = 0.0  # phi of CFG rescale, each channel's mean and std matched to the conditional
    #                           prediction's (text3d.teacher.teacher.rescale_cfg; 0 = plain CFG)
    camera_cfg: bool = False  # view-aware teacher: the real branch's unconditional prediction also without the
    #                           camera, so CFG's direction (cond - uncond) carries the view and is amplified with the text
    reduction: str = "sum"  # sum (d loss / d y = grad) | mean (the gradient divided by the element count)
    camera_guidance: float = 0.0  # view-aware teacher: w of the extra term w (cond - cond without the camera)
    guidance_scale_end: Optional[float] = None  # CFG ramped linearly to this from t_anneal_start of the run on
    #                                             (null: constant): stronger guidance where the detail is drawn
    noise: str = "random"  # random | inversion: the noise found by DDIM inversion of x (SDI; module docstring)
    inversion_steps: int = 3  # noise = inversion: conditional UNet calls of the inversion, 0 -> t
    inversion_from: float = 0.0  # noise = inversion: the fraction of the run guided with random noise first
    relative_baseline: bool = False  # image space with a LoRA: base = D + D(x0_LoRA) - D(x) (module docstring)
    target_steps: int = 1  # image space: the real target K t / T DDIM steps down instead of one (module docstring)
    target_steps_from: float = 0.0  # the fraction of the run guided with the one-step target first


def check_score_config(s: ScoreConfig, name: str) -> None:
    """Range checks of a :class:`ScoreConfig` under the config key ``name`` (one-line ConfigError)."""

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    check(0.0 <= s.t_min < s.t_max <= 1.0, f"need 0 <= {name}.t_min < {name}.t_max <= 1, got {s.t_min}, {s.t_max}")
    check(s.guidance_scale >= 0 and s.lora_guidance_scale >= 0 and (s.guidance_scale_end or 0.0) >= 0,
          f"{name}.guidance_scale, {name}.guidance_scale_end and {name}.lora_guidance_scale must be >= 0")
    check(s.t_anneal in TimestepSchedule.KINDS,
          f"{name}.t_anneal must be one of {', '.join(TimestepSchedule.KINDS)}, got {s.t_anneal!r}")
    if s.t_anneal != "none" and s.t_max_end is not None:
        check(s.t_min <= s.t_max_end <= s.t_max, f"need {name}.t_min <= {name}.t_max_end <= {name}.t_max")
    check(s.grad_clip is None or s.grad_clip > 0, f"{name}.grad_clip must be > 0 or null")
    check(s.weighting in WEIGHTINGS, f"{name}.weighting must be one of {', '.join(WEIGHTINGS)}, got {s.weighting!r}")
    check(s.space in SPACES, f"{name}.space must be latent or image, got {s.space!r}")
    check(s.reduction in REDUCTIONS, f"{name}.reduction must be sum or mean, got {s.reduction!r}")
    check(s.image_weight > 0, f"{name}.image_weight must be > 0, got {s.image_weight}")
    check(s.perp_neg >= 0, f"{name}.perp_neg must be >= 0, got {s.perp_neg}")
    check(s.camera_guidance >= 0, f"{name}.camera_guidance must be >= 0, got {s.camera_guidance}")
    check(0.0 <= s.cfg_rescale <= 1.0, f"{name}.cfg_rescale must be in [0, 1], got {s.cfg_rescale}")
    check(s.noise in NOISES, f"{name}.noise must be random or inversion, got {s.noise!r}")
    check(s.inversion_steps >= 1, f"{name}.inversion_steps must be >= 1, got {s.inversion_steps}")
    check(0.0 <= s.inversion_from <= 1.0, f"{name}.inversion_from must be in [0, 1], got {s.inversion_from}")
    check(s.target_steps >= 1, f"{name}.target_steps must be >= 1, got {s.target_steps}")
    check(s.target_steps == 1 or s.space == "image", f"{name}.target_steps > 1 needs {name}.space = image")
    check(0.0 <= s.target_steps_from <= 1.0, f"{name}.target_steps_from must be in [0, 1], got {s.target_steps_from}")


@dataclass
class GuidanceOutput:
    loss: torch.Tensor  # scalar; backward() sends ``grad`` into the latents (image space: the image)
    grad: torch.Tensor  # [B, C, h, w] (image space: [B, 3, H, W]), detached
    t: torch.Tensor  # [B] integer timesteps
    latents: torch.Tensor  # [B, C, h, w]: the noised latents (attached to the caller's graph in latent space)
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


def _camera_branches(teacher, camera_cfg: bool, camera_guidance: float, k: int) -> tuple[tuple[int, ...], bool]:
    """Which of ``k`` prediction branches run without the camera (``camera_cfg``: the unconditional one) and whether
    a last branch, the prompt's without the camera, is added (``camera_guidance`` on a view-aware teacher)."""
    extra = bool(camera_guidance) and bool(getattr(teacher, "camera_dim", 0))
    return ((0,) if camera_cfg else ()) + ((k,) if extra else ()), extra


def _combine(preds: list[torch.Tensor], extra: bool, scale: float, weights, camera_guidance: float,
             batch: int) -> torch.Tensor:
    """The guided prediction (noise or decoded image) from the branches ``[uncond, cond, *negatives]`` and, with
    ``extra``, a last one without the camera: Perp-Neg's CFG plus ``camera_guidance (cond - cond without camera)``."""
    view = preds.pop() if extra else None
    if weights is None:
        weights = torch.zeros(0, batch)
    guided = apply_perp_neg(preds[0], preds[1], preds[2:], weights, scale)
    return guided if view is None else guided + camera_guidance * (preds[1] - view)


def _branch_x0(teacher, noisy, t, cond, uncond, scale: float, lora=None, condition=None, negatives=(),
               camera_cfg: bool = False, camera_guidance: float = 0.0) -> tuple[list[torch.Tensor], bool]:
    """One image-space branch's x0 predictions (latents), before decoding: ``[cond]`` alone at scale 1 without
    negatives (the same image, one UNet batch instead of two), else ``[uncond, cond, *negatives]`` and, with
    ``camera_guidance`` on a view-aware teacher, the prompt's without the camera; ``camera_cfg``: the
    unconditional one without the camera too. Returns them and whether that last one is there."""
    if scale == 1.0 and not negatives and not camera_guidance:
        eps = [teacher.predict_eps(noisy, t, cond) if lora is None else lora.predict_eps(noisy, t, cond, condition)]
        extra = False
    else:
        branches = [uncond, cond, *negatives]
        no_camera, extra = _camera_branches(teacher, camera_cfg, camera_guidance, len(branches))
        with lora.active(condition) if lora is not None else nullcontext():
            eps = teacher.predict_eps_many(noisy, t, branches + [cond] * extra, no_camera=no_camera)
    return [predict_x0(teacher, noisy, e, t) for e in eps], extra


def _decode_all(teacher, x0: list[torch.Tensor]) -> list[torch.Tensor]:
    """Every x0 in one VAE call: one batch of K*B runs the decoder's convolutions faster on the CPU than K
    batches of B (scripts/bench_step.py)."""
    return list(teacher.decode_latents(torch.cat(x0)).chunk(len(x0)))


def _guided_image(images: list[torch.Tensor], extra: bool, scale: float, weights=None, rescale: float = 0.0,
                  camera_guidance: float = 0.0) -> torch.Tensor:
    """A branch's guided image from its decoded predictions (:func:`_branch_x0`): the one image at scale 1, else
    clamp(CFG of the images (Perp-Neg with negatives, ``+ w (cond - cond without the camera)`` with ``extra``), 0, 1),
    CFG-rescaled by ``rescale``."""
    if len(images) == 1:
        return images[0]
    guided = _combine(images, extra, scale, weights, camera_guidance, images[0].shape[0])
    return rescale_cfg(guided, images[1], rescale).clamp(0.0, 1.0)


def _real_eps(teacher, noisy, t, cond, uncond, scale: float, negatives=(), weights=None,
              rescale: float = 0.0, camera_cfg: bool = False, camera_guidance: float = 0.0) -> torch.Tensor:
    """The real branch in latent space: the teacher's guided noise prediction (Perp-Neg with negatives),
    CFG-rescaled by ``rescale``; ``camera_cfg``: the unconditional prediction without the camera too;
    ``camera_guidance``: plus ``w (cond - cond without the camera)``."""
    if negatives or rescale or camera_cfg or camera_guidance:
        branches = [uncond, cond, *negatives]
        no_camera, extra = _camera_branches(teacher, camera_cfg, camera_guidance, len(branches))
        eps = teacher.predict_eps_many(noisy, t, branches + [cond] * extra, no_camera=no_camera)
        guided = _combine(eps, extra, scale, weights, camera_guidance, noisy.shape[0])
        return rescale_cfg(guided, eps[1], rescale)
    return teacher.predict_eps(noisy, t, cond, uncond, guidance_scale=scale)


def target_timesteps(t: torch.Tensor, target_steps: int, num_train_timesteps: int) -> list[torch.Tensor]:
    """The timesteps [B] of a ``target_steps`` target from ``t`` [B] (module docstring): ``k = round(K max(t) / T)``
    (at least 1) of them, ``s_i = round(t (k - i) / k)`` for ``i = 0 .. k - 1``, the first ``t`` itself."""
    k = max(1, round(target_steps * int(t.max()) / num_train_timesteps))
    return [(t.float() * (k - i) / k).round().long() for i in range(k)]


def _denoised_start(teacher, noisy, t, cond, uncond, cfg: ScoreConfig, negatives=(), weights=None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The real branch's last noisy latents and timestep of a ``target_steps`` target: every step but the last
    (module docstring); ``(noisy, t)`` itself for a one-step target."""
    steps = target_timesteps(t, cfg.target_steps, teacher.num_train_timesteps) if cfg.target_steps > 1 else [t]
    z = noisy
    for s, s_next in zip(steps, steps[1:]):
        x0, extra = _branch_x0(teacher, z, s, cond, uncond, cfg.guidance_scale, negatives=negatives,
                               camera_cfg=cfg.camera_cfg, camera_guidance=cfg.camera_guidance)
        image = _guided_image(_decode_all(teacher, x0), extra, cfg.guidance_scale, weights, cfg.cfg_rescale,
                              cfg.camera_guidance)
        x0 = teacher.encode_images(image).float()
        ab, ab_next = teacher.alpha_bar(s), teacher.alpha_bar(s_next)
        eps = (z - ab.sqrt() * x0) / (1.0 - ab).sqrt()
        z = ab_next.sqrt() * x0 + (1.0 - ab_next).sqrt() * eps
    return z, steps[-1]


def score_gradient(teacher: Teacher, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor,
                   uncond: torch.Tensor, cfg: ScoreConfig, lora: LoRAScoreNetwork | None = None, condition: torch.Tensor | None = None,
                   image: torch.Tensor | None = None, negatives: Sequence[torch.Tensor] = (),
                   negative_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The gradient of every score-distillation method (module docstring), without a graph.

    ``latents`` [B, C, h, w] are noised with ``noise`` at ``t``; ``lora`` is the baseline branch (None: the
    noise itself, i.e. SDS), called with ``condition``; ``image`` [B, 3, H, W] is what the gradient applies
    to in image space (the render, or the decoded student). ``negatives`` are Perp-Neg's extra embedding
    batches for the real branch, with ``negative_weights`` [K, B]. Returns the unsanitised gradient, shaped
    like ``latents`` (latent space) or ``image`` (image space)."""
    with torch.no_grad():
        x = latents.detach().float()
        noisy = teacher.add_noise(x, noise, t)
        if cfg.space == "image":
            if image is None:
                raise ValueError("image-space score distillation needs the image the gradient applies to")
            z, s = _denoised_start(teacher, noisy, t, cond, uncond, cfg, negatives, negative_weights)
            real_x0, extra = _branch_x0(teacher, z, s, cond, uncond, cfg.guidance_scale, negatives=negatives,
                                        camera_cfg=cfg.camera_cfg, camera_guidance=cfg.camera_guidance)
            base_x0 = [] if lora is None else _branch_x0(teacher, noisy, t, cond, uncond, cfg.lora_guidance_scale,
                                                         lora=lora, condition=condition)[0]
            relative = lora is not None and cfg.relative_baseline
            # the real and the LoRA's branches (and, relative, the latents themselves) in one VAE call
            images = _decode_all(teacher, real_x0 + base_x0 + ([x] if relative else []))
            real = _guided_image(images[:len(real_x0)], extra, cfg.guidance_scale, negative_weights, cfg.cfg_rescale,
                                 cfg.camera_guidance)
            base = image.detach() if lora is None else _guided_image(
                images[len(real_x0):len(real_x0) + len(base_x0)], False, cfg.lora_guidance_scale)
            if relative:
                base = image.detach() + (base - images[-1])
            grad = cfg.image_weight * (base - real)
            if cfg.weighting == "dmd":
                grad = grad / (image.detach() - real).abs().flatten(1).mean(dim=1).clamp_min(1e-8).view(-1, 1, 1, 1)
            elif cfg.weighting != "sigma2":
                raise ValueError(f"unknown weighting {cfg.weighting!r}")
            return grad
        eps_real = _real_eps(teacher, noisy, t, cond, uncond, cfg.guidance_scale, negatives, negative_weights,
                             cfg.cfg_rescale, cfg.camera_cfg, cfg.camera_guidance)
        eps_base = noise if lora is None else lora.predict_eps(noisy, t, cond, condition, uncond_embeddings=uncond,
                                                              guidance_scale=cfg.lora_guidance_scale)
        if cfg.weighting == "sigma2":
            return (1.0 - teacher.alpha_bar(t)) * (eps_real - eps_base)
        if cfg.weighting == "dmd":
            x0_real = predict_x0(teacher, noisy, eps_real, t)
            x0_base = predict_x0(teacher, noisy, eps_base, t)
            scale = (x - x0_real).abs().flatten(1).mean(dim=1).clamp_min(1e-8).view(-1, 1, 1, 1)
            return (x0_base - x0_real) / scale
        raise ValueError(f"unknown weighting {cfg.weighting!r}")


class ScoreDistillation:
    """Score distillation against a frozen :class:`~text3d.teacher.teacher.Teacher`, with the noise (``lora``
    None: SDS) or a LoRA score network (VSD, the 2D fake score) as the baseline branch.

    ``cfg`` is read at every call, so it may be replaced between calls. Trainable state belongs to the
    configuration that owns a LoRA (:meth:`update`, :meth:`state_dict`); the noise baseline has none.
    """

    def __init__(self, teacher: Teacher, cfg: ScoreConfig, lora: LoRAScoreNetwork | None = None,
                 negative_prompt: str = ""):
        self.teacher, self.cfg, self.lora, self.negative_prompt = teacher, cfg, lora, negative_prompt
        self.schedule = TimestepSchedule(teacher.num_train_timesteps, cfg.t_min, cfg.t_max, cfg.t_anneal,
                                         cfg.t_max_end, cfg.t_anneal_start)

    # -------------------------------------------------------------- draws
    def sample_t(self, batch: int, progress: float = 0.0) -> torch.Tensor:
        """Integer timesteps [batch] on the teacher's device from the schedule at ``progress``."""
        return self.schedule.sample(batch, progress, device=self.teacher.device)

    def guidance_scale_at(self, progress: float) -> float:
        """The real branch's CFG scale at ``progress``: ``guidance_scale``, ramped linearly to ``guidance_scale_end``
        from ``t_anneal_start`` of the run on when that is set."""
        cfg = self.cfg
        if cfg.guidance_scale_end is None:
            return cfg.guidance_scale
        return cfg.guidance_scale + (cfg.guidance_scale_end - cfg.guidance_scale) * anneal_fraction(
            progress, cfg.t_anneal_start)

    def draw_noise(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                   progress: float = 0.0) -> torch.Tensor:
        """The step's noise [B, C, h, w] (float32): random, or with ``noise = "inversion"`` from ``inversion_from``
        of the run on the noise that DDIM inversion of ``latents`` to ``t`` with the conditional prediction finds
        (module docstring)."""
        if self.cfg.noise != "inversion" or progress < self.cfg.inversion_from:
            return torch.randn(latents.shape, dtype=torch.float32).to(latents.device)
        with torch.no_grad():
            x = latents.detach().float()
            x_t = ddim_invert(self.teacher, x, lambda z, s: self.teacher.predict_eps(z, s, cond), t,
                              self.cfg.inversion_steps)
            ab = self.teacher.alpha_bar(t).to(x.device)
            return (x_t - ab.sqrt() * x) / (1.0 - ab).sqrt()

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """The ``sigma2`` weighting w(t) = 1 - alpha_bar_t, shaped [B, 1, 1, 1]."""
        return 1.0 - self.teacher.alpha_bar(t)

    def condition(self, cameras: Cameras | None, batch: int) -> torch.Tensor | None:
        """The baseline's condition for these cameras (none here; VSD conditions its LoRA on the camera)."""
        return None

    # ---------------------------------------------------------- gradients
    def guide(self, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, progress: float = 0.0,
              image: torch.Tensor | None = None, condition: torch.Tensor | None = None, negatives=(),
              negative_weights: torch.Tensor | None = None, t: torch.Tensor | None = None,
              noise: torch.Tensor | None = None) -> GuidanceOutput:
        """Draw ``t`` and the noise (unless given), form :func:`score_gradient` and inject it into ``latents``
        (latent space) or ``image`` (image space) with the target trick."""
        cfg = self.cfg
        batch = latents.shape[0]
        t = self.schedule.sample(batch, progress, device=latents.device) if t is None else t.to(latents.device)
        if noise is None:
            noise = self.draw_noise(latents, t, cond, progress)
        if cfg.guidance_scale_end is not None:
            cfg = replace(cfg, guidance_scale=self.guidance_scale_at(progress))
        if cfg.target_steps > 1 and progress < cfg.target_steps_from:
            cfg = replace(cfg, target_steps=1)
        grad = score_gradient(self.teacher, latents, t, noise, cond, uncond, cfg, self.lora, condition=condition,
                              image=image if cfg.space == "image" else None, negatives=negatives,
                              negative_weights=negative_weights)
        grad, nonfinite = sanitize_grad(grad, cfg.grad_clip)
        target = image if cfg.space == "image" else latents.float()
        loss = target_trick_loss(target, grad)
        if cfg.reduction == "mean":
            loss = loss / target.numel()
        return GuidanceOutput(loss, grad, t, latents, nonfinite)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], progress: float = 0.0, cameras: Cameras | None = None,
                 t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> GuidanceOutput:
        """The gradient for rendered ``images`` [B, 3, H, W] in [0, 1], one prompt per image: into the VAE
        latents (back through the encoder) in latent space, straight into the resized pixels in image space."""
        if self.cfg.space != "image":
            return self.guide_latents(self.teacher.encode_images(images), prompts, progress, cameras, t=t, noise=noise)
        pixels = self.teacher.resize_images(images).float()
        with torch.no_grad():
            latents = self.teacher.encode_images(pixels.detach())
        return self.guide_latents(latents, prompts, progress, cameras, t=t, noise=noise, image=pixels)

    def guide_latents(self, latents: torch.Tensor, prompts: Sequence[str], progress: float = 0.0,
                      cameras: Cameras | None = None,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                      image: torch.Tensor | None = None) -> GuidanceOutput:
        """:meth:`guide` for ``latents`` of views with one prompt each (and, in image space, their ``image``):
        the prompts are encoded, Perp-Neg's negatives and the cameras' condition formed here."""
        batch = latents.shape[0]
        if len(prompts) != batch:
            raise ValueError(f"{len(prompts)} prompts for {batch} images")
        cond = self.teacher.encode_prompts(list(prompts))
        uncond = self.teacher.encode_prompts([self.negative_prompt] * batch)
        negatives, weights = self.perp_negatives(prompts)
        with self.teacher.viewing(cameras):  # a view-aware teacher sees each view's camera, in every branch
            return self.guide(latents, cond, uncond, progress, image=image, condition=self.condition(cameras, batch),
                              negatives=negatives, negative_weights=weights, t=t, noise=noise)

    def from_latents(self, x: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, progress: float = 0.0,
                     t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> GuidanceOutput:
        """The gradient for generated latents ``x`` (a 2D student's x0, attached to its graph): into ``x``,
        or in image space into its decoding ``D(x)`` and back through the decoder."""
        image = self.teacher.decode_latents(x.float(), clamp=False) if self.cfg.space == "image" else None
        return self.guide(x, cond, uncond, progress, image=image, t=t, noise=noise)

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

    # ------------------------------------------------- trainable state (none)
    def update(self, output: GuidanceOutput, prompts: Sequence[str], cameras: Cameras | None = None) -> dict[str, float]:
        """Called once per 3D step after the asset's update, with that step's guidance output."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise RuntimeError(f"{type(self).__name__} has no state, got keys {sorted(state)[:3]}")
