"""The judge: a small CNN that names the object, colour and view label of a toyworld image.

It is the project's analogue of CLIP R-precision: an image generated for "a red cube, side view"
scores when the judge says object=cube, colour=red, view=side. Its penultimate embedding
(:meth:`Judge.features`) is the feature space of the Fréchet distance (:mod:`text3d.eval.frechet`).

Architecture: ``len(channels)`` blocks of stride-2 conv3x3 -> BatchNorm -> ReLU on RGB at
``image_size`` (64 by default; other sizes are resized with antialiasing), global average pooling,
a linear+ReLU embedding, and three linear heads (~200k parameters by default; strided convolutions
rather than max-pooling keep a training step ~5x cheaper on a CPU). Inputs are [B, 3, H, W] floats
in [0, 1].

On disk (:meth:`Judge.save` / :meth:`Judge.load`): ``model.safetensors`` and ``config.json`` (the
architecture, the label names, and whatever ``info`` the trainer recorded).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from text3d.errors import UserError

HEADS = ("object", "colour", "view")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = 1


class Judge(nn.Module):
    """Three-headed image classifier (object, colour, view label) over toyworld label names."""

    def __init__(self, objects: Sequence[str], colours: Sequence[str], view_labels: Sequence[str],
                 image_size: int = 64, channels: Sequence[int] = (32, 64, 96, 128), embed_dim: int = 128):
        super().__init__()
        self.labels = {"object": list(objects), "colour": list(colours), "view": list(view_labels)}
        if any(len(v) < 1 for v in self.labels.values()):
            raise ValueError("the judge needs at least one label per head")
        self.image_size, self.channels, self.embed_dim = int(image_size), [int(c) for c in channels], int(embed_dim)
        blocks, c_in = [], 3
        for c in self.channels:
            blocks += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.trunk = nn.Sequential(*blocks)
        self.embed = nn.Sequential(nn.Linear(c_in, self.embed_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({h: nn.Linear(self.embed_dim, len(self.labels[h])) for h in HEADS})
        self.info: dict = {}  # what the trainer recorded (accuracies, data, settings), from config.json

    # ------------------------------------------------------------------ model

    def config(self) -> dict:
        return {"format": FORMAT, "image_size": self.image_size, "channels": self.channels,
                "embed_dim": self.embed_dim, "objects": self.labels["object"], "colours": self.labels["colour"],
                "view_labels": self.labels["view"]}

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> resized to image_size and mapped to [-1, 1], on the judge's device."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"the judge expects [B, 3, H, W] images, got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return x * 2.0 - 1.0

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate embedding [B, embed_dim] (what the heads see; the Fréchet feature space)."""
        h = self.trunk(self.prepare(images))
        return self.embed(h.mean(dim=(2, 3)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head: {"object": [B, n_objects], "colour": [B, n_colours], "view": [B, n_views]}."""
        f = self.features(images)
        return {h: self.heads[h](f) for h in HEADS}

    @torch.no_grad()
    def run(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Eval-mode predictions over any number of images, on the CPU: per head the predicted index
        [N] (long) and ``{head}_probs`` [N, K]; and ``features`` [N, embed_dim]."""
        was_training = self.training
        self.eval()
        parts: dict[str, list[torch.Tensor]] = {}
        try:
            for i in range(0, len(images), batch_size):
                f = self.features(images[i:i + batch_size])
                parts.setdefault("features", []).append(f.cpu())
                for h in HEADS:
                    parts.setdefault(f"{h}_probs", []).append(self.heads[h](f).softmax(-1).cpu())
        finally:
            self.train(was_training)
        if not parts:
            raise ValueError("the judge was given no images")
        out = {k: torch.cat(v) for k, v in parts.items()}
        for h in HEADS:
            out[h] = out[f"{h}_probs"].argmax(-1)
        return out

    def index(self, head: str, name: str) -> int | None:
        """The index of label ``name`` of ``head`` (None if the judge does not know it)."""
        try:
            return self.labels[head].index(name)
        except ValueError:
            return None

    # ------------------------------------------------------------------ files

    def save(self, folder: str | Path, info: dict | None = None) -> Path:
        """Write ``model.safetensors`` and ``config.json`` (plus ``info`` under "info") into ``folder``."""
        from safetensors.torch import save_file

        from text3d.runtime.atomic import atomic_path, atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "text3d": "judge"})
        config = self.config()
        if info:
            config["info"] = info
        atomic_write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str = "cpu") -> "Judge":
        """A judge saved with :meth:`save`, in eval mode; one-line UserError if the folder is not one."""
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
            raise UserError(f"{folder} is not a judge folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                            f"train one with scripts/train_judge.py")
        try:
            cfg = json.loads((folder / CONFIG_NAME).read_text())
            judge = cls(cfg["objects"], cfg["colours"], cfg["view_labels"], image_size=cfg["image_size"],
                        channels=cfg["channels"], embed_dim=cfg["embed_dim"])
            judge.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        except Exception as exc:  # JSON, missing keys, wrong shapes, corrupt safetensors
            raise UserError(f"judge in {folder} is corrupt or incomplete ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        judge.info = cfg.get("info", {})
        judge.requires_grad_(False)
        return judge.to(device).eval()


# ---------------------------------------------------------------------- training


@dataclass
class JudgeTrainConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    holdout: float = 0.1  # fraction of the dataset held out for accuracy
    seed: int = 0
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 96, 128)
    embed_dim: int = 128
    augment: bool = True
    max_shift: float = 0.08  # translation, as a fraction of the image size
    scale_range: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.1  # multiplicative jitter 1 +- brightness
    label_smoothing: float = 0.05
    eval_every: int = 0  # 0: evaluate the holdout only at the end


def split_indices(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) indices: a seeded permutation, the last ``holdout`` fraction held out."""
    if n < 2:
        raise UserError(f"the dataset has {n} example(s); the judge needs at least 2")
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = int(round(n * holdout)) if holdout > 0 else 0
    n_hold = min(max(n_hold, 1 if holdout > 0 else 0), n - 1)
    return np.sort(perm[: n - n_hold]), np.sort(perm[n - n_hold:])


def augment_batch(x: torch.Tensor, cfg: JudgeTrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random small translation + isotropic scale (edge pixels extend, i.e. the background) and
    brightness jitter. No flips: a mirrored front/back object is not the same view."""
    b = x.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    lo, hi = cfg.scale_range
    scale = lo + (hi - lo) * u(b)
    shift = (u(b, 2) * 2 - 1) * (2 * cfg.max_shift)  # grid units: the image spans [-1, 1]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    gain = 1.0 + (u(b, 1, 1, 1) * 2 - 1) * cfg.brightness
    return (x * gain).clamp(0.0, 1.0)


def _resized_uint8(images: np.ndarray, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 [N, R, R, 3] -> uint8 [N, 3, size, size] (antialiased resize only when needed)."""
    t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if t.shape[-1] == size and t.shape[-2] == size:
        return t.contiguous()
    out = []
    for i in range(0, len(t), chunk):
        x = F.interpolate(t[i:i + chunk].float() / 255.0, size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)
        out.append((x * 255.0 + 0.5).clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def predict_labels(judge: Judge, images: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Predicted index per head [N] for float images in [0, 1] (or uint8, divided by 255)."""
    preds: dict[str, list[torch.Tensor]] = {h: [] for h in HEADS}
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        out = judge.run(x, batch_size=batch_size)
        for h in HEADS:
            preds[h].append(out[h])
    return {h: torch.cat(preds[h]) for h in HEADS}


def accuracy(judge: Judge, images: torch.Tensor, labels: dict[str, torch.Tensor], batch_size: int = 256,
             preds: dict[str, torch.Tensor] | None = None) -> dict:
    """Per-head accuracy of ``judge`` on float images [N, 3, H, W] in [0, 1] (or uint8, divided by 255)."""
    preds = preds if preds is not None else predict_labels(judge, images, batch_size)
    return {h: float((preds[h] == labels[h].long()).float().mean()) for h in HEADS}


def view_accuracy_per_object(judge: Judge, preds: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict:
    """{object name: view accuracy on its examples} (objects without examples left out)."""
    out = {}
    for k, name in enumerate(judge.labels["object"]):
        sel = labels["object"] == k
        if bool(sel.any()):
            out[name] = float((preds["view"][sel] == labels["view"][sel]).float().mean())
    return out


def train_judge(dataset, steps: int | None = None, cfg: JudgeTrainConfig | None = None, progress: bool = False,
                device: torch.device | str = "cpu", **overrides) -> tuple[Judge, dict]:
    """Train a judge on a :class:`~text3d.toyworld.dataset.ToyworldDataset` (or anything with
    ``arrays`` and ``objects``/``colours``/``view_labels``).

    A seeded split holds out ``cfg.holdout`` of the examples; returns the judge (eval mode) and a
    report: held-out and train accuracy per head, sizes, settings and seconds.
    Keyword ``overrides`` set fields of the config (e.g. ``batch_size=32``).
    """
    from dataclasses import asdict, replace

    cfg = replace(cfg or JudgeTrainConfig(), **overrides)
    if steps is not None:
        cfg = replace(cfg, steps=int(steps))
    if cfg.steps < 1:
        raise UserError(f"the judge needs at least 1 training step, got {cfg.steps}")
    t0 = time.perf_counter()
    arrays = dataset.arrays
    n = len(arrays["images"])
    train_idx, hold_idx = split_indices(n, cfg.holdout, cfg.seed)
    images = _resized_uint8(arrays["images"], cfg.image_size)
    labels = {h: torch.from_numpy(np.asarray(arrays[h]).astype(np.int64)) for h in HEADS}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        judge = Judge(dataset.objects, dataset.colours, dataset.view_labels, image_size=cfg.image_size,
                      channels=cfg.channels, embed_dim=cfg.embed_dim)
    for h in HEADS:
        if len(labels[h]) and int(labels[h].max()) >= len(judge.labels[h]):
            raise UserError(f"dataset {h} labels go up to {int(labels[h].max())} but the meta lists "
                            f"{len(judge.labels[h])} names")
    judge = judge.to(device).train()
    opt = torch.optim.AdamW(judge.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:  # linear warm-up, then cosine to 2% of the peak
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, p))))

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    train_t = torch.from_numpy(train_idx)
    history = []
    from text3d.runtime.loop import NonFiniteSteps, TrainingLoop

    nonfinite = NonFiniteSteps(1, hint="lower the learning rate")  # the first NaN/inf loss stops the training
    order, pos = train_t[torch.randperm(len(train_t), generator=gen)], 0

    def step_fn(step: int) -> dict:  # step counts from 1; lr_at from 0
        nonlocal order, pos
        if pos + cfg.batch_size > len(order):  # reshuffle each epoch
            order, pos = train_t[torch.randperm(len(train_t), generator=gen)], 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        x = images[idx].float() / 255.0
        if cfg.augment:
            x = augment_batch(x, cfg, gen)
        logits = judge(x.to(device))
        loss = sum(F.cross_entropy(logits[h], labels[h][idx].to(device), label_smoothing=cfg.label_smoothing)
                   for h in HEADS)
        value = float(loss.detach())
        if not math.isfinite(value):
            nonfinite.skip("judge training loss", step)
            return {"loss": value, "skipped": 1.0}
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": value}

    def evaluate(step: int, stats: dict) -> None:
        if len(hold_idx):
            acc = accuracy(judge, images[torch.from_numpy(hold_idx)], {h: labels[h][hold_idx] for h in HEADS})
            history.append({"step": step, "loss": stats["loss"], **acc})
            loop.message(f"step {step}: holdout " + " ".join(f"{h}={a:.3f}" for h, a in acc.items()))

    loop = TrainingLoop(cfg.steps, description="judge", show_progress=progress, every=[(cfg.eval_every, evaluate)],
                        nonfinite=nonfinite)
    loop.run(step_fn)

    judge.eval()
    judge.requires_grad_(False)
    train_eval = train_idx if len(train_idx) <= 4096 else np.sort(
        np.random.default_rng(cfg.seed).choice(train_idx, 4096, replace=False))
    hold_labels = {h: labels[h][hold_idx] for h in HEADS}
    hold_preds = predict_labels(judge, images[torch.from_numpy(hold_idx)]) if len(hold_idx) else None
    report = {
        "train_accuracy": accuracy(judge, images[torch.from_numpy(train_eval)],
                                   {h: labels[h][train_eval] for h in HEADS}),
        "holdout_accuracy": (accuracy(judge, None, hold_labels, preds=hold_preds) if len(hold_idx) else None),
        "holdout_view_accuracy_per_object": (view_accuracy_per_object(judge, hold_preds, hold_labels)
                                             if len(hold_idx) else None),
        "n_train": int(len(train_idx)), "n_holdout": int(len(hold_idx)),
        "n_parameters": int(sum(p.numel() for p in judge.parameters())),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "history": history,
        "seconds": round(time.perf_counter() - t0, 1),
        "torch_threads": torch.get_num_threads(),
    }
    return judge, report
