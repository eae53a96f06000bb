"""The progress display (text3d.runtime.progress): plain lines at a steady interval off a terminal, the first one
after a few steps, and an ETA measured from the first steps on a terminal."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time

import pytest
from rich.console import Console

from text3d.runtime.loop import TrainingLoop
from text3d.runtime.progress import INTERVAL_ENV, LoopProgress, _RemainingColumn

from tests.helpers import FAST, REPO

LINE = re.compile(r"step (\d+)/(\d+) .*?([\d.]+) it/s .*ETA (\d+:\d\d:\d\d)")


def test_off_a_terminal_the_first_line_comes_after_a_few_steps_then_one_per_interval():
    out = io.StringIO()
    bar = LoopProgress(1000, description="toy", console=Console(file=out), interval=0.3)
    assert not bar.interactive
    with bar:
        started = time.perf_counter()
        for step in range(1, 4):
            time.sleep(0.01)
            bar.update(step, {"loss": 0.5})
        first = out.getvalue()
        while time.perf_counter() - started < 1.0:  # about three intervals of steps
            step += 1
            time.sleep(0.01)
            bar.update(step)
    lines = out.getvalue().splitlines()
    found = LINE.search(first)
    assert found and found.group(1) == "3" and found.group(4) != "-:--:--", first  # 10% would be step 100
    assert "loss=0.5" in first and float(found.group(3)) > 0
    assert 2 <= len(lines) <= 6, lines  # one per 0.3 s, not one per step
    assert all(LINE.search(line) for line in lines)


def test_a_training_loop_off_a_terminal_reports_early_from_the_environment_interval(monkeypatch, capsys):
    monkeypatch.setenv(INTERVAL_ENV, "0.2")
    seen = {}

    def step_fn(step):
        time.sleep(0.02)
        return {"loss": 1.0}

    class Seen(Exception):
        pass

    def look(step, stats):
        if step == 6:
            seen["err"] = capsys.readouterr().err
            raise Seen  # the rest of the 500 steps would only take time

    with pytest.raises(Seen):
        TrainingLoop(500, description="toy", log_every=50, every=[(1, look)]).run(step_fn)
    found = LINE.search(seen["err"])
    assert found and int(found.group(1)) <= 6 and found.group(2) == "500", seen["err"]
    assert found.group(4) != "-:--:--"


def test_on_a_terminal_the_eta_is_known_after_the_first_steps():
    bar = LoopProgress(100, description="toy", console=Console(file=io.StringIO(), force_terminal=True))
    assert bar.interactive
    with bar:
        for step in range(1, 4):
            time.sleep(0.01)
            bar.update(step, {"loss": 1.0} if step == 1 else None)
        task = bar.progress.tasks[0]
        eta = str(_RemainingColumn().render(task))
    assert eta != "-:--:--" and 0 <= bar.eta(3) < 30
    assert task.fields["stats"] == "loss=1"


def test_generate_into_a_pipe_prints_a_progress_line_early(tiny_teacher_dir, tmp_path):
    steps = 2000  # 10% would be step 200
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{INTERVAL_ENV: "0.5"})
    proc = subprocess.Popen([sys.executable, "-m", "text3d", "generate", "a red cube",
                             "--teacher", str(tiny_teacher_dir), "--steps", str(steps), "--out", str(tmp_path / "run"), "--no-video", *FAST,
                             "train.log_every=100", "train.checkpoint_every=1000"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        deadline = time.monotonic() + 240
        for line in proc.stderr:
            seen.append(line)
            if LINE.search(line) or time.monotonic() > deadline:
                break
    finally:
        proc.kill()
        proc.wait()
    found = LINE.search(seen[-1]) if seen else None
    assert found, "".join(seen[-20:])
    assert int(found.group(1)) < steps // 10 and found.group(2) == str(steps) and found.group(4) != "-:--:--"
