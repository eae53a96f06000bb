"""Shared test helpers: small, fast run configs and CLI invocation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

# small settings that keep an end-to-end run to a few seconds on 2 CPU cores
FAST = ["train.resolution=32", "train.checkpoint_every=3", "train.preview_every=1000", "train.log_every=1",
        "export.grid_resolution=32", "export.texture_size=64", "export.video_frames=3", "export.video_resolution=32",
        "train.preview_views=2", "sds.guidance_scale=10", "texture.steps=3", "texture.resolution=32",
        "texture.reference_steps=2"]


def run_cli(*args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TEXT3D_DEBUG", None)
    env.update(popen.pop("env_update", {}))
    return subprocess.run([sys.executable, "-m", "text3d", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=popen.pop("cwd", REPO), env=env, **popen)


def mesh_run_folder(folder: Path, prompt: str, shape: str) -> Path:
    """A run folder (config.yaml + asset.glb, no training) whose exported mesh is the world's ``shape``
    (extracted from its SDF), coloured red, for ``text3d eval run``."""
    from text3d.generate.config import load_config, to_yaml
    from text3d.export import ExportConfig, export_asset
    from text3d.toyworld.catalog import COLOURS, OBJECTS

    cfg = load_config(overrides=["export.grid_resolution=64", "export.texture_size=64"])
    folder.mkdir(parents=True, exist_ok=True)
    cfg.prompt, cfg.run_name = prompt, "asset"
    (folder / "config.yaml").write_text(to_yaml(cfg))
    sdf = OBJECTS[shape].sdf
    red = torch.tensor(COLOURS["red"], dtype=torch.float32)
    # an exact SDF surface: nothing to smooth (smoothing would round its edges)
    export_asset(lambda p: 50.0 * torch.sigmoid(-sdf(p) / 0.01), lambda p: red.expand(len(p), 3), 1.0, folder,
                 "asset", ExportConfig(grid_resolution=96, texture_size=64, threshold=25.0, smooth_iterations=0),
                 formats=("glb",))
    return folder


def checkpoint_state(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=True)


def _assert_same_tensors(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for key in a:
        if isinstance(a[key], dict):
            _assert_same_tensors(a[key], b[key], f"{where}.{key}")
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{where}.{key}"


def assert_same_state(a: dict, b: dict) -> None:
    """Same step, bit-identical particles and guidance state (VSD's LoRA)."""
    assert a["step"] == b["step"]
    assert len(a["particles"]) == len(b["particles"])
    for i, (pa, pb) in enumerate(zip(a["particles"], b["particles"])):
        _assert_same_tensors(pa, pb, f"particle {i}")
    _assert_same_tensors(a["guidance"].get("lora", {}), b["guidance"].get("lora", {}), "lora")


def perturbed_lora(teacher, seed: int = 0):
    """A LoRA score network on ``teacher`` whose adapters are moved off zero (so it differs from the teacher)."""
    from text3d.guidance.lora import LoRAScoreNetwork

    lora = LoRAScoreNetwork(teacher, rank=4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return lora
