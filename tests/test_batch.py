"""`text3d batch` on a local Ray runtime: 4 prompts with the tiny test teacher on 2 workers, one worker killed by
pid mid-run (its run resumes from a checkpoint), a bad prompt failing alone, a rerun that does no work, Ctrl-C;
and the one-line errors, which need no Ray."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import FAST, REPO, run_cli
from text3d.batch.plan import default_workers, plan_items, read_batch_prompts
from text3d.batch.progress import BatchProgress
from text3d.errors import UserError

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason='ray is not installed: pip install -e ".[ray]"')
PROMPTS = ["a red cube", "a blue torus", '""', "a green cone", "a yellow sphere"]  # '""': the empty prompt
KILLED = "a-red-cube"


def _args(tiny_teacher_dir, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["batch", str(prompts), "--out", str(out), "--teacher", str(tiny_teacher_dir), "--seed", "1", "--no-video",
            *extra, *FAST]


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", TEXT3D_PROGRESS_INTERVAL="5")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not path.exists():
        time.sleep(0.05)
    assert proc.poll() is None, f"the batch ended before {path} appeared: {proc.communicate()[1][-2000:]}"
    assert path.exists(), f"{path} did not appear in {timeout}s"


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "results.csv", newline="") as f:
        return {r["slug"]: r for r in csv.DictReader(f)}


@needs_ray
def test_batch_survives_a_killed_worker_a_bad_prompt_and_reruns_without_work(tiny_teacher_dir, tmp_path):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "batch"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = _args(tiny_teacher_dir, prompts, out, "--workers", "2", "--steps", "40")
    proc = subprocess.Popen([sys.executable, "-m", "text3d", *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # kill the worker of the first run once its first periodic checkpoint (step 3 of 40) is there
    _wait_for(out / KILLED / "checkpoints" / "last.pt", proc)
    marker = json.loads((out / ".workers" / f"{KILLED}.json").read_text())
    os.kill(marker["pid"], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)

    assert proc.returncode == 1, stderr[-3000:]  # one prompt failed, the others finished
    assert "Traceback" not in stderr and "[batch]" in stderr and "ETA" in stderr
    assert "4 done" in stdout and "1 failed" in stdout and "1 resumed" in stdout
    rows = _rows(out)
    assert len(rows) == 5 and [r["prompt"] for r in rows.values()] == [p.strip('"') for p in PROMPTS]
    done = {slug: r for slug, r in rows.items() if r["status"] == "done"}
    assert len(done) == 4 and len(list(out.glob("*/*.glb"))) == 4
    for slug, r in done.items():
        # 40 NeRF steps, then the default's texture stage (3 steps in tests.helpers.FAST)
        assert (out / r["glb"]).is_file() and r["steps"] == "43" and float(r["wall_seconds"]) > 0
        assert r["object_accuracy"] != "" and r["silhouette_iou"] != ""  # world prompts: the judge scored them
    killed = rows[KILLED]
    assert int(killed["resumed_from"]) > 0 and killed["attempts"] == "2"
    assert all(r["resumed_from"] == "" for slug, r in done.items() if slug != KILLED)
    failed = rows["empty-prompt"]
    assert failed["status"] == "failed" and "prompt is empty" in failed["error"]
    results = json.loads((out / "results.json").read_text())
    assert results["counts"]["done"] == 4 and results["counts"]["failed"] == 1 and results["workers"] == 2
    gallery = (out / "index.html").read_text()
    for slug in done:
        page = out / slug / "index.html"
        assert (f'href="{slug}/index.html"' if page.is_file() else f'href="{rows[slug]["glb"]}"') in gallery
    assert not list((out / ".workers").iterdir())

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/run.json")}
    again = run_cli(*args, env_update={"TEXT3D_PROGRESS_INTERVAL": "5"}, timeout=300)
    assert again.returncode == 1 and "4 done (4 already finished, 0 resumed), 1 failed" in again.stdout, again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/run.json")} == stamps  # no run was touched
    rows_again = _rows(out)
    assert rows_again[KILLED]["resumed_from"] == killed["resumed_from"]
    assert all(rows_again[s]["skipped"] == "True" for s in done)


@needs_ray
def test_ctrl_c_stops_the_batch_and_keeps_the_checkpoints(tiny_teacher_dir, tmp_path):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "batch"
    prompts.write_text("a red cube\na blue torus\n")
    proc = subprocess.Popen([sys.executable, "-m", "text3d",
                             *_args(tiny_teacher_dir, prompts, out, "--workers", "1", "--steps", "100000")],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(out / "a-red-cube" / "checkpoints" / "last.pt", proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "batch stopped" in stderr
    rows = _rows(out)
    assert rows["a-red-cube"]["status"] == "interrupted" and rows["a-blue-torus"]["status"] == "waiting"
    import torch

    state = torch.load(out / "a-red-cube" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] >= 3  # the run saved where it stopped; a rerun resumes it


def test_prompt_file_errors_are_one_line_and_leave_no_files(tmp_path):
    out = tmp_path / "batch"
    missing = run_cli("batch", str(tmp_path / "nope.txt"), "--out", str(out))
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: prompts file {tmp_path / 'nope.txt'} does not exist"
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    none = run_cli("batch", str(empty), "--out", str(out))
    assert none.returncode == 2 and "has no prompts" in none.stderr and len(none.stderr.strip().splitlines()) == 1
    good = tmp_path / "good.txt"
    good.write_text("a red cube\n")
    bad_key = run_cli("batch", str(good), "--out", str(out), "train.nope=1")
    assert bad_key.returncode == 2 and "train.nope" in bad_key.stderr and "Traceback" not in bad_key.stderr
    assert not out.exists()


@needs_ray
def test_a_cluster_that_is_not_there_is_one_line(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\n")
    result = run_cli("batch", str(prompts), "--out", str(tmp_path / "batch"), "--address", "127.0.0.1:1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot reach the Ray cluster at 127.0.0.1:1")
    assert not (tmp_path / "batch").exists()


def test_without_ray_it_names_the_extra(tmp_path):
    fake = tmp_path / "site" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    result = run_cli("batch", str(prompts), "--out", str(tmp_path / "batch"), env_update=env)
    assert result.returncode == 2 and result.stderr.strip() == 'error: text3d batch needs Ray: pip install -e ".[ray]"'
    assert not (tmp_path / "batch").exists()


def test_prompt_file_slugs_and_worker_counts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('# comment\na red cube\n\n""\n"a  \\"quoted\\" cube"\na red cube\n')
    prompts = read_batch_prompts(path)
    assert prompts == ["a red cube", "", 'a  "quoted" cube', "a red cube"]
    assert [i.slug for i in plan_items(prompts)] == ["a-red-cube", "empty-prompt", "a-quoted-cube", "a-red-cube-2"]
    path.write_text('"bad \\q"\n')
    with pytest.raises(UserError, match="line 1"):
        read_batch_prompts(path)
    assert default_workers(cpus=16, gpus=0, threads=4) == 4 and default_workers(cpus=2, gpus=0, threads=1) == 2
    assert default_workers(cpus=16, gpus=3, threads=4) == 3 and default_workers(cpus=1, gpus=0, threads=4) == 1


def test_eta_counts_what_the_running_runs_have_left():
    progress, now = BatchProgress(4, workers=2, echo=lambda line: None), time.time()
    records = [{"slug": "a", "status": "done", "wall_seconds": 100.0}, {"slug": "b", "status": "running"},
               {"slug": "c", "status": "running"}, {"slug": "d", "status": "waiting"}]
    # d takes the mean 100 s, b has 70 s left, c 10 s: 180 s of work on 2 workers
    assert abs(progress.eta(records, {"b": now - 30, "c": now - 90}) - 90.0) < 1.0
    assert progress.eta(records[:1]) == 0.0 and progress.eta(records[1:]) is None
    assert "1/4 done, 2 running, 0 failed, 1 waiting" in progress.line(records)
