"""Failure paths: a write that fails half-way leaves nothing behind; NaN losses stop the run cleanly."""

import errno
import math

import pytest
import torch

from tests.helpers import FAST
from text3d.generate.config import load_config
from text3d.errors import NumericalError
from text3d.guidance.sds import GuidanceOutput
from text3d.teacher import load_teacher
from text3d.runtime.checkpoint import save_checkpoint
from text3d.generate.trainer import AssetTrainer
from text3d.runtime.atomic import atomic_path, atomic_write_text


def test_failed_write_leaves_no_file(tmp_path):
    target = tmp_path / "asset.obj"
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    atomic_write_text(target, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("new, half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["asset.obj"]


def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_nan_loss_skips_steps_then_stops(tiny_teacher_dir, tmp_path):
    cfg = load_config(overrides=FAST + [f"teacher.name_or_path={tiny_teacher_dir}", "train.steps=20",
                                        "train.max_nonfinite_steps=3"])
    cfg.prompt = "a cube"
    trainer = AssetTrainer(cfg, load_teacher(str(tiny_teacher_dir), "cpu"), torch.device("cpu"), tmp_path,
                         show_progress=False)
    real_guidance = trainer.guidance

    def nan_guidance(images, prompts, **kwargs):
        out = real_guidance(images, prompts, **kwargs)
        return GuidanceOutput(out.loss * float("nan"), out.grad, out.t, out.latents, 0)

    trainer.guidance = nan_guidance
    before = {k: v.clone() for k, v in trainer.renderer.state_dict().items()}
    assert trainer.train_step(1).get("skipped") == 1.0
    assert trainer.train_step(2).get("skipped") == 1.0
    with pytest.raises(NumericalError, match="NaN"):
        trainer.train_step(3)
    after = trainer.renderer.state_dict()
    hash_keys = [k for k in before if before[k].is_floating_point() and "occupancy" not in k]
    assert all(torch.equal(before[k], after[k]) for k in hash_keys)  # no NaN step reached the parameters
    trainer.guidance = real_guidance
    stats = trainer.train_step(4)
    assert math.isfinite(stats["loss"]) and "skipped" not in stats
