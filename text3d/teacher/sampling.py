"""Deterministic DDIM sampling from a teacher, shared by `text3d sample` and the 2D distillation methods.

Conventions (those of :mod:`text3d.teacher.teacher`):
  * ``x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps`` with ``ab_t = alphas_cumprod[t]``, t in [0, T).
  * ``t_prev = -1`` stands for "clean": ``ab = 1``, so the last DDIM step returns the predicted x0.
  * Timesteps are spaced "trailing" by default (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed"; diffusers' ``timestep_spacing="trailing"``): the first step is always
    ``T - 1``, so ``steps=1`` is a one-step prediction of x0 from pure noise at ``t = T - 1``.
    ``spacing="leading"`` gives Stable Diffusion's original DDIM schedule (``steps_offset=1``:
    981, 961, ..., 1 for 50 of 1000), which never starts at ``T - 1``.
  * Classifier-free guidance is the teacher's (:meth:`Teacher.predict_eps` with ``uncond_emb`` and
    ``guidance_scale``), the one CFG formula of the project.
  * Everything runs in float32 under ``torch.no_grad``; random numbers come from the caller's
    ``generator`` (drawn on the generator's device, then moved), so a seed fixes the result.
"""

from __future__ import annotations

from typing import Callable, Sequence

import math

import numpy as np
import torch

SPACINGS = ("trailing", "leading")
SAMPLERS = ("ddim", "renoise", "stochastic")


def ddim_timesteps(num_train_timesteps: int, steps: int, spacing: str = "trailing",
                   steps_offset: int = 1) -> torch.Tensor:
    """``steps`` distinct training timesteps in descending order, as a LongTensor.

    ``trailing`` (default): ``round(T - i * T / steps) - 1`` for i = 0..steps-1, i.e. it starts at
    ``T - 1`` and ends near ``T / steps - 1`` (identical to diffusers' "trailing" spacing).
    ``leading``: ``i * (T // steps) + steps_offset`` reversed (Stable Diffusion's DDIM default).
    """
    T, steps = int(num_train_timesteps), int(steps)
    if not 1 <= steps <= T:
        raise ValueError(f"the number of sampling steps must be between 1 and {T}, got {steps}")
    if spacing == "trailing":
        ts = np.round(T - np.arange(steps) * (T / steps)).astype(np.int64) - 1
    elif spacing == "leading":
        ts = (np.arange(steps)[::-1] * (T // steps) + int(steps_offset)).astype(np.int64)
        ts = np.clip(ts, 0, T - 1)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    return torch.from_numpy(ts.copy())


def _alphas(teacher_or_alphas) -> torch.Tensor:
    alphas = teacher_or_alphas if isinstance(teacher_or_alphas, torch.Tensor) else teacher_or_alphas.alphas_cumprod
    return alphas.float()


def _alpha_bar(alphas: torch.Tensor, t, batch: int, device: torch.device) -> torch.Tensor:
    """alpha_bar at ``t`` (int or [B]) as [B, 1, 1, 1] float32; t < 0 means 1 (clean)."""
    t = torch.as_tensor(t, device=alphas.device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"timesteps have {t.numel()} entries for a batch of {batch}")
    if bool((t >= alphas.numel()).any()):
        raise ValueError(f"timestep {int(t.max())} is outside the schedule (0..{alphas.numel() - 1})")
    ab = torch.where(t >= 0, alphas[t.clamp_min(0)], torch.ones((), dtype=alphas.dtype, device=alphas.device))
    return ab.to(device).view(-1, 1, 1, 1)


def predict_x0(teacher_or_alphas, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """``x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)`` (float32)."""
    ab = _alpha_bar(_alphas(teacher_or_alphas), t, x_t.shape[0], x_t.device)
    return (x_t.float() - (1.0 - ab).sqrt() * eps.float()) / ab.sqrt()


def ddim_step(teacher_or_alphas, x_t: torch.Tensor, eps: torch.Tensor, t, t_prev, eta: float = 0.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """One DDIM update from ``t`` to ``t_prev`` (ints or [B] tensors; ``t_prev = -1``: to x0).

    ``teacher_or_alphas`` is a Teacher or its ``alphas_cumprod`` tensor. With ``eta = 0`` the step is
    deterministic; ``eta = 1`` is DDPM-like ancestral sampling, with noise drawn from ``generator``:

        x0     = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
        sigma  = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev)
        x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z
    """
    alphas = _alphas(teacher_or_alphas)
    batch = x_t.shape[0]
    ab = _alpha_bar(alphas, t, batch, x_t.device)
    ab_prev = _alpha_bar(alphas, t_prev, batch, x_t.device)
    x_t, eps = x_t.float(), eps.float()
    x0 = (x_t - (1.0 - ab).sqrt() * eps) / ab.sqrt()
    if eta:
        sigma = eta * ((1.0 - ab_prev) / (1.0 - ab)).sqrt() * (1.0 - ab / ab_prev).clamp_min(0.0).sqrt()
    else:
        sigma = torch.zeros_like(ab)
    direction = (1.0 - ab_prev - sigma**2).clamp_min(0.0).sqrt() * eps
    x_prev = ab_prev.sqrt() * x0 + direction
    if eta:
        gen_device = generator.device if generator is not None else x_t.device
        z = torch.randn(x_t.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x_t.device)
        x_prev = x_prev + sigma * z
    return x_prev


def ddim_invert(teacher_or_alphas, x0: torch.Tensor, eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                t, steps: int) -> torch.Tensor:
    """Deterministic DDIM inversion of clean ``x0`` up to timestep ``t`` (int or [B] tensor) in ``steps`` steps.

    The timesteps ``s_k = round(k t / steps)``, ``k = 0 .. steps``, are climbed with the DDIM update run upwards,
    ``x_{s_{k+1}} = sqrt(ab_{k+1}) x0(x_{s_k}) + sqrt(1 - ab_{k+1}) eps(x_{s_k}, s_k)``, starting from ``x_{s_0} = x0``
    (taken as clean, ``ab = 1``) with ``eps_fn(x, s)`` the model's noise prediction at timesteps ``s`` [B]: ``steps``
    model calls. Returns ``x_t`` (float32); ``(x_t - sqrt(ab_t) x0) / sqrt(1 - ab_t)`` is the noise that the forward
    process would have to draw to reach it (SDI's inverted noise, Lukoianov et al. 2024)."""
    if steps < 1:
        raise ValueError(f"ddim_invert needs steps >= 1, got {steps}")
    alphas = _alphas(teacher_or_alphas)
    batch = x0.shape[0]
    t = torch.as_tensor(t, device=x0.device).long().reshape(-1).expand(batch)
    x, prev = x0.float(), torch.full_like(t, -1)  # -1: clean (ab = 1); the model sees it at timestep 0
    for k in range(1, steps + 1):
        nxt = (t.float() * k / steps).round().long()
        x = ddim_step(alphas, x, eps_fn(x, prev.clamp_min(0)), prev, nxt)
        prev = nxt
    return x


def progressive_target(teacher_or_alphas, eps_fn: Callable[[torch.Tensor, int], torch.Tensor], z_t: torch.Tensor,
                       t: int, t_mid: int, t_next: int) -> torch.Tensor:
    """Progressive distillation's x-target (Salimans & Ho): two deterministic DDIM steps of the teacher
    ``t -> t_mid -> t_next`` (``eps_fn(z, t)`` is its noise prediction), then the x0 that takes one DDIM
    step ``t -> t_next`` to the same point:

        x~ = (z_next - (sigma_next / sigma_t) z_t) / (alpha_next - (sigma_next / sigma_t) alpha_t)

    (alpha = sqrt(ab), sigma = sqrt(1 - ab); for ``t_next = -1`` it is the teacher's final x0)."""
    alphas = _alphas(teacher_or_alphas)
    batch = z_t.shape[0]
    z_mid = ddim_step(alphas, z_t, eps_fn(z_t, t), t, t_mid)
    z_next = ddim_step(alphas, z_mid, eps_fn(z_mid, t_mid), t_mid, t_next)
    ab_t = _alpha_bar(alphas, t, batch, z_t.device)
    ab_next = _alpha_bar(alphas, t_next, batch, z_t.device)
    ratio = (1.0 - ab_next).sqrt() / (1.0 - ab_t).sqrt()
    return (z_next - ratio * z_t.float()) / (ab_next.sqrt() - ratio * ab_t.sqrt())


def renoise_step(teacher_or_alphas, z: torch.Tensor, t_from: int, t_to: int, noise: torch.Tensor) -> torch.Tensor:
    """Forward diffusion from ``t_from`` to the noisier ``t_to`` (``t_from = -1``: from clean data):
    ``sqrt(ab_to / ab_from) z + sqrt(1 - ab_to / ab_from) noise``."""
    alphas = _alphas(teacher_or_alphas)
    ratio = _alpha_bar(alphas, t_to, z.shape[0], z.device) / _alpha_bar(alphas, t_from, z.shape[0], z.device)
    return ratio.sqrt() * z.float() + (1.0 - ratio).clamp_min(0.0).sqrt() * noise


def guidance_embedding(w: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of guidance scales ``w`` [B] (scaled by 1000, like a timestep), the
    ``timestep_cond`` input of a guidance-conditioned UNet (``time_cond_proj_dim = dim``)."""
    w = w.float().reshape(-1) * 1000.0
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=w.device) / max(1, half))
    args = w[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim - emb.shape[1]))


def guidance_conditioned(teacher) -> int:
    """The guidance-embedding size of a w-conditioned UNet, 0 for an ordinary one."""
    return int(getattr(teacher.unet.config, "time_cond_proj_dim", None) or 0)


def initial_latents(teacher, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal latents [batch, C, h, w] for ``teacher``, drawn on the generator's device."""
    shape = (batch, teacher.latent_channels, teacher.latent_size, teacher.latent_size)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(teacher.device)


@torch.no_grad()
def sample_latents(teacher, prompts: str | Sequence[str], steps: int = 50, guidance_scale: float = 7.5,
                   generator: torch.Generator | None = None, eta: float = 0.0, latents: torch.Tensor | None = None,
                   progress: bool = False, negative: str = "", spacing: str = "trailing",
                   callback: Callable[[int, int, torch.Tensor], None] | None = None,
                   timesteps: Sequence[int] | None = None, sampler: str = "ddim") -> torch.Tensor:
    """Samples [B, C, h, w] (float32) for ``prompts``, one per prompt.

    ``latents`` is the starting noise x_T (default: drawn from ``generator``); ``negative`` is the
    prompt of the unconditional CFG branch; ``guidance_scale = 1`` runs the conditional branch only.
    ``callback(i, t, x)`` is called after each step i (0-based) with the new latents.
    ``timesteps`` (descending) replaces the ``steps``/``spacing`` grid. ``sampler`` is ``ddim``
    (deterministic DDIM), ``renoise`` (few-step students: predict x0, then noise it afresh to the
    next timestep; the last x0 is the sample) or ``stochastic`` (guided distillation's N-step
    sampler: a deterministic DDIM step of twice the length, then forward noise back by one step).
    A guidance-conditioned UNet gets ``guidance_scale`` as its ``timestep_cond`` input and runs one
    pass per step (no CFG batch).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("sample_latents needs at least one prompt")
    batch = len(prompts)
    if latents is None:
        x = initial_latents(teacher, batch, generator)
    else:
        if latents.shape[0] != batch:
            raise ValueError(f"{latents.shape[0]} starting latents for {batch} prompts")
        x = latents.to(teacher.device, torch.float32)
    cond = teacher.encode_prompts(prompts)
    uncond = teacher.encode_prompts([negative]).expand(batch, -1, -1)
    timesteps = (list(timesteps) if timesteps is not None
                 else ddim_timesteps(teacher.num_train_timesteps, steps, spacing).tolist())
    unet_kwargs = {}
    w_dim = guidance_conditioned(teacher)
    if w_dim:
        w = torch.full((batch,), float(guidance_scale), device=teacher.device)
        unet_kwargs["timestep_cond"] = guidance_embedding(w, w_dim).to(teacher.dtype)
        guidance_scale = 1.0
    bar = None
    if progress:
        from text3d.runtime.progress import LoopProgress

        bar = LoopProgress(total=len(timesteps), description="sampling").__enter__()
    try:
        for i, t in enumerate(timesteps):
            t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            eps = teacher.predict_eps(x, t, cond, uncond, guidance_scale=guidance_scale, **unet_kwargs)
            if sampler == "stochastic":
                t_skip = timesteps[i + 2] if i + 2 < len(timesteps) else -1
                x = ddim_step(teacher, x, eps, t, t_skip)
                if t_prev >= 0:
                    x = renoise_step(teacher, x, t_skip, t_prev, initial_latents(teacher, batch, generator))
            elif sampler == "renoise":
                x = predict_x0(teacher, x, eps, t)
                if t_prev >= 0:
                    x = teacher.add_noise(x, initial_latents(teacher, batch, generator), torch.tensor(t_prev))
            else:
                x = ddim_step(teacher, x, eps, t, t_prev, eta=eta, generator=generator)
            if callback is not None:
                callback(i, t, x)
            if bar is not None:
                bar.update(i + 1, {"t": t})
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    return x


@torch.no_grad()
def sample_images(teacher, prompts: str | Sequence[str], steps: int = 50, guidance_scale: float = 7.5,
                  generator: torch.Generator | None = None, eta: float = 0.0, latents: torch.Tensor | None = None,
                  progress: bool = False, negative: str = "", spacing: str = "trailing",
                  callback: Callable[[int, int, torch.Tensor], None] | None = None,
                  timesteps: Sequence[int] | None = None, sampler: str = "ddim") -> torch.Tensor:
    """:func:`sample_latents` decoded by the teacher's VAE: images [B, 3, H, W] in [0, 1] (float32)."""
    z = sample_latents(teacher, prompts, steps=steps, guidance_scale=guidance_scale, generator=generator, eta=eta,
                       latents=latents, progress=progress, negative=negative, spacing=spacing, callback=callback,
                       timesteps=timesteps, sampler=sampler)
    return teacher.decode_latents(z)
