"""The frozen teacher: a latent diffusion model exposed through the few calls guidance needs.

Conventions (every guidance method relies on them):
  * ``t`` is a LongTensor [B] of training timesteps in [0, num_train_timesteps).
  * ``alpha_bar(t)`` is the DDPM cumulative product, shaped [B, 1, 1, 1], float32;
    ``x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps``.
  * Latents are VAE posterior means times the VAE scaling factor; images are [B, 3, H, W] in [0, 1].
  * The UNet runs in the teacher dtype (fp16 on CUDA by default); everything returned is float32.
  * Classifier-free guidance is :func:`apply_cfg`, the one formula of the project.
  * Nothing here is wrapped in ``torch.no_grad`` except prompt encoding: callers decide whether
    gradients flow (SDS does not need them, a VSD LoRA or image-space losses do).
  * A view-aware teacher (a UNet with ``class_embed_type: projection`` of
    :data:`~text3d.cameras.CAMERA_FEATURES` inputs, MVDream-style) adds an embedding of the camera,
    :func:`~text3d.cameras.camera_features`, to its timestep embedding. Inside ``with teacher.viewing(cameras)``
    every UNet call sees those cameras (every branch of a CFG or Perp-Neg batch, and a LoRA on the same
    UNet); outside it, the all-zero "no camera" input it was also trained on. Other teachers ignore it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from text3d.errors import ConfigError


def apply_cfg(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)`` (scale may be a tensor that broadcasts)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def rescale_cfg(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """CFG rescale (Lin et al., 2024, "Common diffusion noise schedules and sample steps are flawed", eq. 15-16),
    per sample and per channel: ``phi * ((guided - mu_g) sigma_c / sigma_g + mu_c) + (1 - phi) guided``, with
    ``mu``, ``sigma`` each channel's mean and standard deviation over its pixels, of the guided and of the
    conditional prediction. Lin et al. match the standard deviation only (their predictions have zero mean);
    matching each channel's mean too keeps the conditional prediction's colour (in image space, the decoded
    RGB): CFG's extrapolation away from the unconditional mean colour (grey turning green) is undone, its
    spatial contrast (the shape) kept. ``phi = 0`` is plain CFG."""
    if phi == 0.0:
        return guided
    dims = tuple(range(2, guided.ndim))
    mu_g, mu_c = guided.mean(dims, keepdim=True), cond.mean(dims, keepdim=True)
    sigma_g = guided.std(dims, keepdim=True).clamp_min(1e-6)
    sigma_c = cond.std(dims, keepdim=True)
    matched = (guided - mu_g) * (sigma_c / sigma_g) + mu_c
    return phi * matched + (1.0 - phi) * guided


def apply_perp_neg(uncond: torch.Tensor, cond: torch.Tensor, negatives, weights: torch.Tensor, scale) -> torch.Tensor:
    """CFG with Perp-Neg's negatives (Armandpour et al., 2023): ``uncond + scale * (d - sum_i w_i perp_i)``
    with ``d = cond - uncond`` and ``perp_i`` the part of ``negatives[i] - uncond`` orthogonal to ``d``
    (per sample, over all its elements), so a negative removes only what it does not share with the
    positive. ``weights`` is [K, B] (a zero weight switches a negative off for that sample). With no
    negatives this is :func:`apply_cfg` exactly.
    """
    if len(negatives) == 0:
        return apply_cfg(uncond, cond, scale)
    delta = cond - uncond
    flat = delta.flatten(1)
    norm2 = flat.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
    correction = torch.zeros_like(flat)
    for negative, w in zip(negatives, weights):
        d = (negative - uncond).flatten(1)
        perp = d - (d * flat).sum(1, keepdim=True) / norm2 * flat
        correction = correction + w.to(flat).reshape(-1, 1) * perp
    return uncond + scale * (delta - correction.view_as(delta))


def camera_input_dim(unet) -> int:
    """The length of a UNet's camera input: its projection class embedding's input size (a view-aware
    teacher, module docstring), else 0."""
    config = getattr(unet, "config", None)
    if config is None or getattr(config, "class_embed_type", None) != "projection":
        return 0
    return int(getattr(config, "projection_class_embeddings_input_dim", 0) or 0)


def v_to_eps(v: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Noise from a v-prediction: ``eps = sqrt(ab) v + sqrt(1 - ab) x_t`` (alpha_bar broadcasts, e.g. [B,1,1,1])."""
    return alpha_bar.sqrt() * v + (1.0 - alpha_bar).sqrt() * x_t


def sample_to_eps(x0: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Noise from an x0-prediction: ``eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)``."""
    return (x_t - alpha_bar.sqrt() * x0) / (1.0 - alpha_bar).clamp_min(1e-12).sqrt()


@dataclass
class TeacherConfig:
    """Which diffusion model guides the optimisation, and in which precision."""

    name_or_path: str | None = None  # local diffusers folder or hub id; None = the default teacher
    dtype: str = "auto"  # auto = fp32 on CPU, fp16 on CUDA; or fp32 | fp16 | bf16
    local_files_only: bool = False  # never touch the network for hub ids (HF_HUB_OFFLINE=1 does the same)
    # normal | slice (the VAE one image at a time) | lean (slice + the VAE encoder checkpointed) | auto (slice on the
    # CPU for teachers of 256 px or more): Teacher.set_memory_lean
    memory: str = "auto"


def _batched(value: Any, batch: int, copies: int = 2) -> Any:
    """Repeat ``value`` ``copies`` times along dim 0 when it is batched like the latents (tensors, in dicts/lists
    too)."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
        return torch.cat([value] * copies)
    if isinstance(value, dict):
        return {k: _batched(v, batch, copies) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_batched(v, batch, copies) for v in value)
    return value


class Teacher:
    """A frozen latent diffusion model (UNet + VAE + text encoder + tokenizer + DDPM schedule).

    Build one with :func:`load_teacher`. All modules are in eval mode with ``requires_grad`` False.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, device: torch.device | str,
                 dtype: torch.dtype, source: str = ""):
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.device, self.dtype, self.source = torch.device(device), dtype, source
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)
            module.eval()

        self.num_train_timesteps: int = int(scheduler.config.num_train_timesteps)
        self.prediction_type: str = str(scheduler.config.prediction_type)
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ConfigError(f"teacher {source}: unsupported prediction_type {self.prediction_type!r}")
        self.alphas_cumprod: torch.Tensor = scheduler.alphas_cumprod.detach().to(self.device, torch.float32)

        self.latent_channels: int = int(unet.config.in_channels)
        self.vae_scale_factor: int = 2 ** (len(vae.config.block_out_channels) - 1)
        size = unet.config.sample_size
        self.latent_size: int = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.image_size: int = self.latent_size * self.vae_scale_factor
        self.scaling_factor: float = float(vae.config.scaling_factor)
        self.shift_factor: float = float(getattr(vae.config, "shift_factor", None) or 0.0)

        max_len = getattr(tokenizer, "model_max_length", None) or 77
        positions = getattr(text_encoder.config, "max_position_embeddings", None)
        self.max_text_length: int = int(min(max_len, positions) if positions else min(max_len, 512))

        self.camera_dim: int = camera_input_dim(unet)  # 0: the teacher does not take a camera
        self._view_features: torch.Tensor | None = None
        self.memory_lean = False
        self._prompt_cache: dict[str, torch.Tensor] = {}
        self._fingerprint: str | None = None
        self.prompt_cache_hits = 0
        self.prompt_cache_misses = 0

    def save_pretrained(self, out: str | os.PathLike, unet=None, extra_files: dict[str, str] | None = None) -> Path:
        """Write this teacher as a diffusers Stable Diffusion folder, atomically (``unet``: another UNet in its
        place, e.g. a distilled student; ``extra_files``: name -> text written beside the components), so
        :func:`load_teacher` loads it back."""
        from text3d.runtime.atomic import atomic_dir
        from text3d.teacher.loader import save_components

        out = Path(out).expanduser().resolve()
        with atomic_dir(out) as tmp:
            save_components(tmp, self.vae, unet if unet is not None else self.unet, self.text_encoder, self.tokenizer,
                            self.scheduler)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
        return out

    def fingerprint(self) -> str:
        """A short hash of the UNet's, VAE's and text encoder's weights (each tensor's shape, sum and absolute
        sum; peft LoRA weights left out): what a cache of teacher outputs is keyed by, so that retraining a
        teacher in place (same folder) does not reuse samples of its old weights. Computed once."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            with torch.no_grad():
                for prefix, module in (("unet", self.unet), ("vae", self.vae), ("text", self.text_encoder)):
                    for name, tensor in module.state_dict().items():
                        if "lora_" in name:  # adapters a trainer attached (peft) are not the teacher's weights
                            continue
                        t = tensor.detach().double()
                        name = name.replace(".base_layer", "")  # peft's wrapper renames the frozen weight
                        digest.update(f"{prefix}.{name}{tuple(t.shape)}{float(t.sum()):.10e}"
                                      f"{float(t.abs().sum()):.10e}".encode())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def __repr__(self) -> str:
        return (f"Teacher({self.source!r}, device={self.device}, dtype={self.dtype}, "
                f"prediction={self.prediction_type}, image={self.image_size}px, "
                f"latents={self.latent_channels}x{self.latent_size}x{self.latent_size})")

    # ---------------------------------------------------------------- schedule

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar at timesteps ``t`` [B] as a float32 [B, 1, 1, 1] tensor."""
        t = torch.as_tensor(t, device=self.device).long().reshape(-1)
        return self.alphas_cumprod[t].view(-1, 1, 1, 1)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``sqrt(ab) latents + sqrt(1 - ab) noise`` in the dtype of ``latents``."""
        ab = self.alpha_bar(t).to(latents.device, latents.dtype)
        return ab.sqrt() * latents + (1.0 - ab).sqrt() * noise

    # ---------------------------------------------------------------- text

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_text_length, truncation=True,
                                return_tensors="pt")
        kwargs = {}
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            kwargs["attention_mask"] = tokens["attention_mask"].to(self.device)
        out = self.text_encoder(tokens["input_ids"].to(self.device), **kwargs)
        hidden = getattr(out, "last_hidden_state", None)
        return (hidden if hidden is not None else out[0]).to(self.dtype)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text embeddings [B, L, D] in the teacher dtype, without grad; ``""`` is the unconditional prompt.

        Each distinct string is encoded once and cached for the life of the teacher.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        new = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        self.prompt_cache_hits += len(prompts) - len(new)  # lookups served from the cache
        self.prompt_cache_misses += len(new)  # strings run through the text encoder
        if new:
            for prompt, emb in zip(new, self._encode_text(new)):
                self._prompt_cache[prompt] = emb
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def clear_prompt_cache(self) -> None:
        self._prompt_cache.clear()

    # ---------------------------------------------------------------- UNet

    def _timesteps(self, t, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device).long().reshape(-1)
        return t.expand(batch) if t.numel() == 1 else t

    @contextmanager
    def viewing(self, cameras) -> Iterator[None]:
        """UNet calls inside the block see ``cameras`` (a :class:`~text3d.cameras.Cameras` of B views, or their
        [B, 16] features; None: no camera) when the teacher is view-aware (module docstring); a no-op otherwise."""
        if not self.camera_dim or cameras is None:
            yield
            return
        from text3d.cameras import camera_features

        features = cameras if isinstance(cameras, torch.Tensor) else camera_features(cameras)
        with self._seeing(features.to(self.device, torch.float32)):
            yield

    def unviewed(self):
        """A block whose UNet calls see the "no camera" input, even inside :meth:`viewing` (a LoRA on this UNet
        that takes the camera through its own embedding only: ``LoRAScoreConfig.teacher_camera``)."""
        return self._seeing(None)

    @contextmanager
    def _seeing(self, features: torch.Tensor | None) -> Iterator[None]:
        """``features`` [B, 16] (None: no camera) as the UNet's camera input inside the block, restored after."""
        previous, self._view_features = self._view_features, features
        try:
            yield
        finally:
            self._view_features = previous

    def camera_labels(self, batch: int) -> torch.Tensor:
        """The camera input of a UNet batch of ``batch`` latents: the viewed cameras repeated over the batch's
        branches (a CFG or Perp-Neg batch stacks the B views K times), or zeros without cameras."""
        features = self._view_features
        if features is None:
            return torch.zeros(batch, self.camera_dim, device=self.device, dtype=self.dtype)
        if batch % features.shape[0] != 0:
            raise ValueError(f"a UNet batch of {batch} for {features.shape[0]} cameras")
        return features.repeat(batch // features.shape[0], 1).to(self.dtype)

    def unet_output(self, latents_noisy: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor,
                    cross_attention_kwargs: dict | None = None, **unet_kwargs) -> torch.Tensor:
        """The UNet's raw prediction (eps, v or x0 per ``prediction_type``) as float32.

        Inputs are cast to the teacher dtype; extra keyword arguments go to the UNet unchanged; a view-aware
        teacher gets its camera input (:meth:`viewing`) unless ``class_labels`` is given.
        """
        x = latents_noisy.to(self.device, self.dtype)
        if self.camera_dim and "class_labels" not in unet_kwargs:
            unet_kwargs["class_labels"] = self.camera_labels(x.shape[0])
        out = self.unet(x, self._timesteps(t, x.shape[0]), encoder_hidden_states=embeddings.to(self.device, self.dtype),
                        cross_attention_kwargs=cross_attention_kwargs, return_dict=False, **unet_kwargs)[0]
        if out.shape[1] == 2 * self.latent_channels:  # learned-variance models: keep the mean prediction
            out = out[:, : self.latent_channels]
        return out.float()

    def to_eps(self, model_output: torch.Tensor, latents_noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert a raw UNet output to a noise prediction (float32)."""
        model_output = model_output.float()
        if self.prediction_type == "epsilon":
            return model_output
        ab = self.alpha_bar(t).to(model_output.device)
        x_t = latents_noisy.to(model_output.device, torch.float32)
        if self.prediction_type == "v_prediction":
            return v_to_eps(model_output, x_t, ab)
        return sample_to_eps(model_output, x_t, ab)

    def predict_eps(self, latents_noisy: torch.Tensor, t: torch.Tensor, cond_emb: torch.Tensor,
                    uncond_emb: torch.Tensor | None = None, guidance_scale: float = 1.0,
                    cross_attention_kwargs: dict | None = None, **unet_kwargs) -> torch.Tensor:
        """Noise prediction with classifier-free guidance, float32, same shape as ``latents_noisy``.

        With ``uncond_emb`` and ``guidance_scale != 1`` the UNet runs once on the batch
        ``[uncond, cond]`` (tensors in ``unet_kwargs`` batched like the latents are repeated to match);
        otherwise it runs on the conditional batch only. Not under ``no_grad``: callers decide.
        """
        t = self._timesteps(t, latents_noisy.shape[0])
        if uncond_emb is None or (not isinstance(guidance_scale, torch.Tensor) and guidance_scale == 1.0):
            out = self.unet_output(latents_noisy, t, cond_emb, cross_attention_kwargs, **unet_kwargs)
            return self.to_eps(out, latents_noisy, t)
        eps_uncond, eps_cond = self.predict_eps_branches(latents_noisy, t, cond_emb, uncond_emb,
                                                         cross_attention_kwargs, **unet_kwargs)
        return apply_cfg(eps_uncond, eps_cond, guidance_scale)

    def predict_eps_branches(self, latents_noisy: torch.Tensor, t: torch.Tensor, cond_emb: torch.Tensor,
                             uncond_emb: torch.Tensor, cross_attention_kwargs: dict | None = None,
                             **unet_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """The unguided noise predictions ``(eps_uncond, eps_cond)`` from one UNet call on ``[uncond, cond]``,
        for callers that combine the branches somewhere other than in eps (image-space SDS)."""
        eps_uncond, eps_cond = self.predict_eps_many(latents_noisy, t, [uncond_emb, cond_emb],
                                                     cross_attention_kwargs, **unet_kwargs)
        return eps_uncond, eps_cond

    def predict_eps_many(self, latents_noisy: torch.Tensor, t: torch.Tensor, embeddings: Sequence[torch.Tensor],
                         cross_attention_kwargs: dict | None = None, no_camera: Sequence[int] = (),
                         **unet_kwargs) -> list[torch.Tensor]:
        """Unguided noise predictions of the same noisy latents under each of ``embeddings`` (K tensors
        [B, L, D]), from one UNet call on the stacked batch; a list of K tensors like ``latents_noisy``.
        On a view-aware teacher the branches numbered in ``no_camera`` get the "no camera" input instead of the
        viewed cameras (camera CFG: an unconditional branch without text *and* camera)."""
        batch, k = latents_noisy.shape[0], len(embeddings)
        t = self._timesteps(t, batch)
        xk = torch.cat([latents_noisy] * k)
        tk = torch.cat([t] * k)
        emb = torch.cat([e.to(self.device, self.dtype) for e in embeddings])
        unet_kwargs = _batched(unet_kwargs, batch, k)
        if no_camera and self.camera_dim and "class_labels" not in unet_kwargs:
            labels = self.camera_labels(batch * k).clone()
            for branch in no_camera:
                labels[branch * batch:(branch + 1) * batch] = 0.0
            unet_kwargs["class_labels"] = labels
        out = self.unet_output(xk, tk, emb, cross_attention_kwargs, **unet_kwargs)
        return list(self.to_eps(out, xk, tk).chunk(k))

    def enable_attention_slicing(self, slice_size: str | int = "auto") -> None:
        """Trade speed for memory in the UNet's attention (for large teachers on small GPUs). Not part of the
        lean mode: torch's fused scaled-dot-product attention (diffusers' default processor, on the CPU too)
        never holds the [tokens x tokens] map, and slicing would replace it by one that does, per slice."""
        self.unet.set_attention_slice(slice_size)

    def set_memory_lean(self, checkpoint_encoder: bool = False) -> None:
        """The memory-lean modes (``teacher.memory``): the VAE encodes and decodes a batch one image at a time
        (the same numbers; the peak holds one image's activations instead of the batch's); with
        ``checkpoint_encoder`` the VAE encoder also recomputes its activations in the backward pass instead of
        keeping them (at 512 px the graph of one encode holds 3.3 GB, 0.6 GB checkpointed; one more encoder
        forward per step)."""
        self.vae.enable_slicing()
        if checkpoint_encoder:  # (the decoder too: it matters only where decoding keeps a graph, in image space)
            self.vae.enable_gradient_checkpointing()
        self.memory_lean = True

    # ---------------------------------------------------------------- VAE

    def resize_images(self, rgb: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] on the teacher device, resized (bilinear, differentiable) to ``image_size``."""
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise ValueError(f"teacher images must be [B, 3, H, W], got {tuple(rgb.shape)}")
        x = rgb.to(self.device)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x.float(), size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x

    def encode_images(self, rgb: torch.Tensor) -> torch.Tensor:
        """Differentiable latents (float32) of images [B, 3, H, W] in [0, 1].

        Images are resized (bilinear) to ``image_size`` if needed, mapped to [-1, 1], and encoded to
        the VAE posterior mean, scaled by the VAE's scaling factor.
        """
        x = (self.resize_images(rgb) * 2.0 - 1.0).to(self.dtype)
        mean = self.vae.encode(x).latent_dist.mean
        return ((mean.float() - self.shift_factor) * self.scaling_factor)

    def decode_latents(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Images [B, 3, image_size, image_size] in [0, 1] (float32; clamped unless ``clamp=False``, which
        keeps the gradient alive outside the range) from latents."""
        z = (latents.to(self.device).float() / self.scaling_factor + self.shift_factor).to(self.dtype)
        image = (self.vae.decode(z, return_dict=False)[0].float() + 1.0) * 0.5
        return image.clamp(0.0, 1.0) if clamp else image


def load_teacher(cfg_or_name: TeacherConfig | str | os.PathLike | None = None, device: torch.device | str = "auto",
                 dtype: str | torch.dtype | None = None) -> Teacher:
    """Load a teacher from a :class:`TeacherConfig`, a local diffusers folder or a hub id.

    ``device`` is ``auto|cpu|cuda[:N]`` or a torch.device; ``dtype`` overrides the config's.
    Raises :class:`~text3d.errors.TeacherError` (one line) when the model cannot be loaded.
    """
    from text3d.teacher.loader import load_components, resolve_dtype
    from text3d.utils.backends import resolve_device

    cfg = cfg_or_name if isinstance(cfg_or_name, TeacherConfig) else TeacherConfig(
        name_or_path=None if cfg_or_name is None else os.fspath(cfg_or_name))
    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    torch_dtype = resolve_dtype(dtype if dtype is not None else cfg.dtype, device)
    parts = load_components(cfg.name_or_path, device, torch_dtype, local_files_only=cfg.local_files_only)
    teacher = Teacher(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"], parts["scheduler"],
                      device=device, dtype=torch_dtype, source=parts["source"])
    memory = (cfg.memory or "auto").lower()
    if memory not in ("auto", "normal", "slice", "lean"):
        raise ConfigError(f"teacher.memory must be auto, normal, slice or lean, got {cfg.memory!r}")
    if memory in ("slice", "lean") or memory == "auto" and device.type == "cpu" and teacher.image_size >= 256:
        teacher.set_memory_lean(checkpoint_encoder=memory == "lean")
    return teacher
