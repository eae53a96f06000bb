"""Checkpoints: a run that crashes or is killed resumes from its last checkpoint and ends exactly
where an uninterrupted run with the same seed ends."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import FAST, REPO, assert_same_state, checkpoint_state, run_cli
from text3d.generate.config import load_config
from text3d.errors import CheckpointError
from text3d.generate.run import generate, resume


def _cfg(teacher, steps):
    cfg = load_config(overrides=FAST + [f"teacher.name_or_path={teacher}", f"train.steps={steps}", "seed=11",
                                        "train.albedo_warmup=0.2"])
    cfg.prompt = "a blue torus"
    return cfg


class SimulatedKill(Exception):
    pass


def test_resume_after_crash_matches_uninterrupted_run(tiny_teacher_dir, tmp_path):
    full = generate(_cfg(tiny_teacher_dir, 8), out=tmp_path / "full", show_progress=False, video=False)

    def crash(trainer, step, stats):
        if step == 5:  # after the checkpoint of step 3, before the one of step 6
            raise SimulatedKill

    with pytest.raises(SimulatedKill):
        generate(_cfg(tiny_teacher_dir, 8), out=tmp_path / "crashed", show_progress=False, callbacks=[crash])
    assert checkpoint_state(tmp_path / "crashed")["step"] == 3
    resumed = resume(tmp_path / "crashed", show_progress=False, video=False)
    assert resumed.steps == 8 + 3  # the NeRF's, then the texture stage's (tests.helpers.FAST)
    assert_same_state(checkpoint_state(full.run_dir), checkpoint_state(tmp_path / "crashed"))


def test_different_seeds_differ(tiny_teacher_dir, tmp_path):
    a = generate(_cfg(tiny_teacher_dir, 3), out=tmp_path / "a", show_progress=False, video=False)
    cfg = _cfg(tiny_teacher_dir, 3)
    cfg.seed = 12
    b = generate(cfg, out=tmp_path / "b", show_progress=False, video=False)
    sa, sb = checkpoint_state(a.run_dir)["particles"][0], checkpoint_state(b.run_dir)["particles"][0]
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


def test_sigkill_then_resume_via_cli(tiny_teacher_dir, tmp_path):
    args = ["generate", "a green cone", "--teacher", str(tiny_teacher_dir), "--steps", "40", "--seed", "5", "-q",
            "--no-video", *FAST, "train.checkpoint_every=1"]
    reference = run_cli(*args, "--out", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "text3d", *args, "--out", str(tmp_path / "killed")], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and checkpoint_state(tmp_path / "killed")["step"] >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_state(tmp_path / "killed")["step"]
    assert 3 <= killed_at < 40
    done = run_cli("generate", "--resume", str(tmp_path / "killed"), "-q", "--no-video")
    assert done.returncode == 0, done.stderr
    assert_same_state(checkpoint_state(tmp_path / "ref"), checkpoint_state(tmp_path / "killed"))


def test_ctrl_c_saves_and_exits_130(tiny_teacher_dir, tmp_path):
    out = tmp_path / "int"
    proc = subprocess.Popen([sys.executable, "-m", "text3d", "generate", "a cube", "--teacher", str(tiny_teacher_dir),
                             "--steps", "100000", "--out", str(out), "-q", *FAST, "train.checkpoint_every=100000"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "config.yaml").exists():
        time.sleep(0.05)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err and "checkpoint saved" in err
    assert checkpoint_state(out)["step"] >= 1


def test_corrupt_checkpoint_is_a_clean_error(tiny_teacher_dir, tmp_path):
    run = generate(_cfg(tiny_teacher_dir, 3), out=tmp_path / "c", show_progress=False, video=False)
    ckpt = run.run_dir / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        resume(run.run_dir, show_progress=False)
    result = run_cli("generate", "--resume", str(run.run_dir))
    assert result.returncode != 0 and "Traceback" not in result.stderr and "corrupt" in result.stderr
