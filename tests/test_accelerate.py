"""`text3d distill2d` under `accelerate launch` on 2 CPU processes (gloo): both processes step, their students
(and fake scores) stay identical, one student and one checkpoint are written, and `--resume` under the same launch
continues to where an uninterrupted 2-process run ends."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.helpers import REPO
from text3d.distill2d.processes import launch_warning

SMALL = ["batch_size=2", "regression.pairs=4", "regression.sampler_steps=2", "real_images=8", "sample_every=1000",
         "checkpoint_every=1", "log_every=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args: str) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2 -m text3d distill2d ARGS``: two processes, one thread each;
    on a machine without GPUs accelerate's --multi_gpu launcher is torchrun, and the processes use gloo."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "text3d", "distill2d",
               *args, "-q", "--no-eval"]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)


@pytest.mark.skipif(shutil.which("accelerate", path=os.path.dirname(sys.executable)) is None
                    and shutil.which("accelerate") is None, reason="the accelerate command is not installed")
def test_two_processes_step_together_stay_identical_and_resume(tiny_teacher_dir, tmp_path):
    # dmd2: a student (DDP), a fake-score LoRA and a GAN head (averaged by hand)
    common = ["--method", "dmd2", "--teacher", str(tiny_teacher_dir), *SMALL, "fake.steps=2"]
    part, full = tmp_path / "part", tmp_path / "full"
    first = _launch(*common, "--steps", "2", "--out", str(part))
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((part / "summary.json").read_text())
    replicas = summary["replicas"]
    assert summary["processes"] == 2 and summary["student_steps"] == 2
    assert replicas["counts"] == [{"student_steps": 2, "fake_steps": 4}] * 2  # both processes stepped
    assert replicas["identical"] and len(set(replicas["student"])) == 1 and len(set(replicas["fake"])) == 1
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["last.pt", "rng_rank1.pt"]
    assert (part / "student" / "unet").is_dir() and [p.name for p in part.iterdir() if p.name.startswith("student")] \
        == ["student"]

    resumed = _launch("--resume", str(part), "steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = json.loads((part / "summary.json").read_text())
    assert after["steps"] == 4 and after["replicas"]["identical"]
    assert after["replicas"]["counts"] == [{"student_steps": 4, "fake_steps": 8}] * 2
    assert after["replicas"]["student"] != replicas["student"]  # it went on training

    straight = _launch(*common, "--steps", "4", "--out", str(full))
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = json.loads((full / "summary.json").read_text())["replicas"]
    # each process resumed its own random stream: the same students as a 2-process run that never stopped
    assert reference["student"] == after["replicas"]["student"] and reference["fake"] == after["replicas"]["fake"]


def test_accelerate_cpu_launcher_with_one_process_is_named(monkeypatch):
    for key in ("WORLD_SIZE", "MASTER_ADDR", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key, raising=False)
    assert launch_warning() is None
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # what `accelerate launch --cpu --num_processes 2` sets
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert "--multi_gpu --num_processes N" in launch_warning()
    monkeypatch.setenv("WORLD_SIZE", "2")  # a real multi-process launch
    assert launch_warning() is None
