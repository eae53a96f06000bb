"""A LoRA score network on the frozen teacher's UNet (ProlificDreamer's variational score, and the
"fake"/LoRA teacher of SwiftBrush and DMD).

peft LoRA adapters are added to the attention projections (``to_q``, ``to_k``, ``to_v``,
``to_out.0``) of the teacher's own UNet: the base weights are shared, and the adapters are
switched on only inside :meth:`LoRAScoreNetwork.active`, so every other call of the teacher sees
the unmodified frozen model. An optional condition vector (the flattened camera-to-world matrix
for 3D) goes through a small MLP whose output is added to the UNet's timestep embedding by a
forward hook. The MLP's last layer and peft's LoRA ``B`` matrices start at zero, so a fresh
network predicts exactly what the teacher predicts.

One training step serves VSD's LoRA and the 2D fake score alike (:func:`lora_denoising_loss`,
:func:`optimizer_step`): the teacher's own diffusion loss on detached samples ``x``,
``L = mean_b w_b ||f_LoRA(x_t, t, c) - target(x, eps, t)||^2`` at ``t ~ U[t_min, t_max) * T`` in the
teacher's prediction space (eps, v or x0), with ``w_b = alpha_bar_t`` (SwiftBrush) or 1, a fraction
``null_prompt_prob`` of prompts replaced by the empty one (SwiftBrush) and a fraction ``camera_drop`` of
conditions zeroed (VSD). Its settings are one :class:`LoRAScoreConfig`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import torch
from torch import nn

from text3d.errors import ConfigError

if TYPE_CHECKING:
    from text3d.teacher.teacher import Teacher

ADAPTER_NAME = "text3d_lora"
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class LoRAScoreConfig:
    """A LoRA score network and its training (VSD's ``vsd.lora``, the 2D fake score's ``fake``)."""

    rank: int = 4
    alpha: Optional[float] = None  # LoRA scale is alpha / rank; None = rank (scale 1)
    lr: float = 1e-3
    steps: int = 1  # LoRA updates per 3D step / per student step (DMD2's two time-scale rule uses 5)
    t_min: float = 0.0  # training timesteps ~ U[t_min, t_max) * T
    t_max: float = 1.0
    null_prompt_prob: float = 0.0  # fraction of training prompts replaced by the empty one (SwiftBrush: 0.1)
    alpha_weighted: bool = False  # weight the per-sample loss by alpha_bar_t (SwiftBrush)
    camera_condition: bool = False  # condition on the camera through the time embedding (VSD)
    camera_drop: float = 0.0  # fraction of training samples whose condition is zeroed
    camera_hidden: int = 64
    teacher_camera: bool = True  # on a view-aware teacher, the adapted UNet also gets the teacher's own camera input;
    #                              false: its "no camera" input, the camera reaching the LoRA through its MLP only


def check_lora_config(c: LoRAScoreConfig, name: str) -> None:
    """Range checks of a :class:`LoRAScoreConfig` under the config key ``name`` (one-line ConfigError)."""
    problems = [
        (c.rank >= 1 and (c.alpha is None or c.alpha > 0), f"{name}.rank must be >= 1 and {name}.alpha > 0 or null"),
        (c.lr > 0 and c.steps >= 0, f"{name}.lr must be > 0 and {name}.steps >= 0"),
        (0.0 <= c.t_min < c.t_max <= 1.0, f"need 0 <= {name}.t_min < {name}.t_max <= 1"),
        (0.0 <= c.null_prompt_prob <= 1.0, f"{name}.null_prompt_prob must be in [0, 1]"),
        (0.0 <= c.camera_drop <= 1.0 and c.camera_hidden >= 1,
         f"{name}.camera_drop must be in [0, 1] and {name}.camera_hidden >= 1"),
    ]
    for ok, message in problems:
        if not ok:
            raise ConfigError(message)


def _time_embedding_dim(unet) -> int:
    return int(unet.time_embedding.linear_2.out_features)


class ConditionMLP(nn.Module):
    """condition [B, in_dim] -> [B, out_dim], zero at initialisation."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.net(condition)


class LoRAScoreNetwork(nn.Module):
    """LoRA adapters on ``teacher.unet`` plus an optional condition MLP; trainable parts in fp32.

    One network per teacher: building a second one replaces the first's adapters.
    """

    def __init__(self, teacher: Teacher, rank: int = 4, alpha: float | None = None, condition_dim: int = 0,
                 condition_hidden: int = 64, teacher_camera: bool = True):
        super().__init__()
        from peft import LoraConfig
        from peft.tuners.tuners_utils import BaseTunerLayer

        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.teacher = teacher
        unet = teacher.unet
        if ADAPTER_NAME in getattr(unet, "peft_config", {}):
            unet.delete_adapters(ADAPTER_NAME)
        config = LoraConfig(r=rank, lora_alpha=float(alpha if alpha is not None else rank), init_lora_weights=True,
                            target_modules=list(TARGET_MODULES))
        unet.add_adapter(config, adapter_name=ADAPTER_NAME)
        self._lora_params = {name: p for name, p in unet.named_parameters() if "lora_" in name}
        # the adapted layers, found once, and switched by the flag their forward reads (``disable_adapters``): an
        # on/off pair costs 0.4 ms on the embedded teacher's 56 layers, against 2.7 ms through each layer's
        # ``enable_adapters`` and 7.6 ms through the UNet-wide ``unet.enable_adapters()`` (a VSD step makes one
        # pair). A peft whose layers keep the flag elsewhere gets the ``enable_adapters`` path.
        self._tuner_layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self._flag_switch = all(_flag_switchable(m) for m in self._tuner_layers)
        if not self._lora_params:
            raise ValueError("the teacher UNet has no attention projections (to_q/to_k/to_v/to_out.0) for LoRA")
        for p in self._lora_params.values():
            p.data = p.data.float()
            p.requires_grad_(True)  # trainable from here on: the flag switch leaves requires_grad alone
        self._switch_adapters(False)
        self.condition_dim = int(condition_dim)
        self.condition_mlp = (ConditionMLP(condition_dim, _time_embedding_dim(unet), condition_hidden).to(teacher.device)
                              if condition_dim > 0 else None)
        self._condition_embedding: Optional[torch.Tensor] = None
        self._hook = unet.time_embedding.register_forward_hook(self._add_condition)
        self._active = False
        self.teacher_camera = teacher_camera  # False: the teacher's camera input is blanked inside active()

    # ----------------------------------------------------------- parameters
    def lora_parameters(self) -> list[nn.Parameter]:
        return list(self._lora_params.values())

    def trainable_parameters(self) -> list[nn.Parameter]:
        extra = list(self.condition_mlp.parameters()) if self.condition_mlp is not None else []
        return self.lora_parameters() + extra

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"lora.{k}": v.detach().clone() for k, v in self._lora_params.items()}
        if self.condition_mlp is not None:
            state.update({f"condition.{k}": v.detach().clone() for k, v in self.condition_mlp.state_dict().items()})
        return state

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.lora_state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise RuntimeError(f"LoRA state mismatch (missing {missing}, unexpected {extra})")
        with torch.no_grad():
            for k, p in self._lora_params.items():
                p.copy_(state[f"lora.{k}"])
        if self.condition_mlp is not None:
            self.condition_mlp.load_state_dict({k[len("condition."):]: v for k, v in state.items()
                                                if k.startswith("condition.")})

    # ---------------------------------------------------------------- calls
    def _add_condition(self, module, inputs, output):
        if self._active and self._condition_embedding is not None:
            emb = self._condition_embedding.to(output.dtype)
            if output.shape[0] != emb.shape[0]:  # a CFG-doubled batch [uncond, cond]
                emb = emb.repeat(output.shape[0] // emb.shape[0], 1)
            return output + emb
        return output

    @contextmanager
    def active(self, condition: torch.Tensor | None = None) -> Iterator[None]:
        """Adapters on (and ``condition`` [B, condition_dim] added to the time embedding) inside the block; without
        ``teacher_camera`` a view-aware teacher's own camera input is the "no camera" one there.

        The UNet batch may be ``B`` or a CFG-doubled ``2B`` (the condition is repeated)."""
        if self.condition_mlp is not None and condition is not None:
            self._condition_embedding = self.condition_mlp(condition.to(self.teacher.device, torch.float32))
        self._switch_adapters(True)
        self._active = True
        try:
            autocast = (torch.autocast(self.teacher.device.type, dtype=self.teacher.dtype)
                        if self.teacher.dtype in (torch.float16, torch.bfloat16) else _null())
            with autocast, (_null() if self.teacher_camera else self.teacher.unviewed()):
                yield
        finally:
            self._active = False
            self._condition_embedding = None
            self._switch_adapters(False)

    def _switch_adapters(self, on: bool) -> None:
        """Adapters on or off in the UNet's forward pass; the LoRA weights stay trainable either way.

        The flag path touches nothing else. On the fallback, peft's ``enable_adapters(False)`` also sets
        ``requires_grad=False`` on the adapter weights, and autograd then drops their gradients from a graph built
        while they were on, so a loss computed inside :meth:`active` and backpropagated after it would never reach
        them: they are switched back on here."""
        if self._flag_switch:
            for layer in self._tuner_layers:
                layer._disable_adapters = not on
            return
        for layer in self._tuner_layers:  # what unet.enable_adapters() / disable_adapters() do, layer by layer
            layer.enable_adapters(on)
        for p in self._lora_params.values():
            p.requires_grad_(True)

    def predict_eps(self, latents_noisy: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor,
                    condition: torch.Tensor | None = None, uncond_embeddings: torch.Tensor | None = None,
                    guidance_scale: float = 1.0) -> torch.Tensor:
        """The LoRA network's noise prediction (float32): conditional only, or with the teacher's CFG
        formula when ``uncond_embeddings`` are given and ``guidance_scale != 1``."""
        with self.active(condition):
            return self.teacher.predict_eps(latents_noisy, t, embeddings, uncond_embeddings, guidance_scale)

    def raw_output(self, latents_noisy: torch.Tensor, t: torch.Tensor, embeddings: torch.Tensor,
                   condition: torch.Tensor | None = None) -> torch.Tensor:
        """The adapted UNet's raw output (eps, v or x0 like the teacher), float32."""
        with self.active(condition):
            return self.teacher.unet_output(latents_noisy, t, embeddings)

    def denoising_loss(self, latents: torch.Tensor, embeddings: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor, condition: torch.Tensor | None = None,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
        """The standard diffusion loss on clean ``latents`` (detached) in the teacher's prediction
        space (eps, v or x0), optionally weighted per sample by ``weights`` [B]."""
        latents = latents.detach().float()
        noisy = self.teacher.add_noise(latents, noise, t)
        out = self.raw_output(noisy, t, embeddings, condition)
        target = self.target(latents, noise, t)
        per_sample = (out - target).pow(2).flatten(1).mean(dim=1)
        if weights is not None:
            per_sample = per_sample * weights.to(per_sample)
        return per_sample.mean()

    def target(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kind = self.teacher.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "sample":
            return latents
        ab = self.teacher.alpha_bar(t)
        return ab.sqrt() * noise - (1.0 - ab).sqrt() * latents  # v

    def remove(self) -> None:
        """Take the adapters and the hook off the teacher's UNet."""
        self._hook.remove()
        unet = self.teacher.unet
        if ADAPTER_NAME in getattr(unet, "peft_config", {}):
            unet.delete_adapters(ADAPTER_NAME)


@contextmanager
def _null():
    yield


def _flag_switchable(layer) -> bool:
    """Whether ``layer``'s ``disable_adapters`` (what its forward reads) is its ``_disable_adapters`` attribute."""
    if not hasattr(layer, "_disable_adapters"):
        return False
    was = layer._disable_adapters
    try:
        for value in (True, False):
            layer._disable_adapters = value
            if layer.disable_adapters is not value:
                return False
        return True
    finally:
        layer._disable_adapters = was


def lora_denoising_loss(lora: LoRAScoreNetwork, latents: torch.Tensor, cond: torch.Tensor, cfg: LoRAScoreConfig,
                        uncond: torch.Tensor | None = None, condition: torch.Tensor | None = None) -> torch.Tensor:
    """The LoRA's training loss on detached ``latents`` (module docstring). Draws, in this order: the null
    prompts (when ``null_prompt_prob > 0``; needs ``uncond``), ``t``, the noise, the dropped conditions."""
    teacher = lora.teacher
    batch = latents.shape[0]
    if cfg.null_prompt_prob > 0:
        null = (torch.rand(batch) < cfg.null_prompt_prob).to(cond.device).view(-1, 1, 1)
        cond = torch.where(null, uncond, cond)
    T = teacher.num_train_timesteps
    lo = int(cfg.t_min * T)
    t = torch.randint(lo, max(lo + 1, int(cfg.t_max * T)), (batch,)).to(teacher.device)
    noise = torch.randn(latents.shape, dtype=torch.float32).to(latents.device)
    if condition is not None and cfg.camera_drop > 0:
        keep = (torch.rand(batch) >= cfg.camera_drop).float().to(condition.device)
        condition = condition * keep[:, None]
    weights = teacher.alpha_bar(t).flatten() if cfg.alpha_weighted else None
    return lora.denoising_loss(latents, cond, t, noise, condition, weights=weights)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, max_grad_norm: float | None = None,
                   reduce_grads: Callable[[], None] | None = None) -> bool:
    """Zero the gradients, then, if ``loss`` is finite: backward, ``reduce_grads()`` (e.g. averaging across
    processes), clip to ``max_grad_norm``, step. Returns False (nothing changed) for a non-finite loss."""
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return False
    loss.backward()
    if reduce_grads is not None:
        reduce_grads()
    if max_grad_norm is not None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return True


def lora_training_step(lora: LoRAScoreNetwork, optimizer: torch.optim.Optimizer, latents: torch.Tensor,
                       cond: torch.Tensor, cfg: LoRAScoreConfig, uncond: torch.Tensor | None = None,
                       condition: torch.Tensor | None = None) -> torch.Tensor:
    """One LoRA update (:func:`lora_denoising_loss` then :func:`optimizer_step`); returns the loss, which is
    non-finite when the step was skipped."""
    loss = lora_denoising_loss(lora, latents, cond, cfg, uncond, condition)
    optimizer_step(optimizer, loss)
    return loss

