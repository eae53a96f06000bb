"""The run page (index.html), the training curves (train_log.jsonl, curves.png) and `text3d view`: written by
generate, kept across a resume, rewritten by export, served on localhost and drawn by headless Chromium."""

from __future__ import annotations

import json
import re
import socket

import numpy as np
import pytest
from PIL import Image

from browser_helpers import corner_mean, drive, needs_browser, region_mean, serve_in_background
from helpers import FAST, mesh_run_folder, run_cli
from text3d.report.curves import TrainLog, plot_curves, read_log
from text3d.report.page import write_run_page

pytestmark = pytest.mark.usefixtures("one_thread")

BACKGROUND = np.array([0xEE, 0xF0, 0xF3], dtype=float)  # the page's viewer background (text3d.report.page)


def test_train_log_keeps_the_points_before_the_checkpoint(tmp_path):
    log = TrainLog(tmp_path, "nerf")
    for step in range(1, 7):
        log.add(step, {"loss": 10.0 / step, "t": 500.0, "grad": 2.0, "seconds": 0.1, "nan": float("nan")})
    log.flush()
    other = TrainLog(tmp_path, "geometry")  # another group's records are never dropped
    other.records = log.records + [{"step": 9, "group": "geometry", "loss": 1.0}]
    other.flush()
    resumed = TrainLog(tmp_path, "nerf", resume_step=4)  # a session killed after step 6, checkpoint at 4
    assert [r["step"] for r in resumed.records if r["group"] == "nerf"] == [1, 2, 3, 4]
    assert [r["step"] for r in resumed.records if r["group"] == "geometry"] == [9]
    assert "nan" not in resumed.records[0]
    (tmp_path / "train_log.jsonl").write_text((tmp_path / "train_log.jsonl").read_text() + '{"step": 5, "lo')
    assert len(read_log(tmp_path / "train_log.jsonl")) == 7  # a line cut by a crash is skipped
    path = resumed.plot("a title")
    assert Image.open(path).size == (1000, 650)


def test_curves_plot_differs_with_the_data(tmp_path):
    a = plot_curves([{"step": s, "loss": 1.0, "t": 100.0} for s in range(1, 50)], tmp_path / "a.png")
    b = plot_curves([{"step": s, "loss": 1.0 / s, "t": 900.0 - s} for s in range(1, 50)], tmp_path / "b.png")
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_generate_writes_the_page_and_curves_and_resume_keeps_them(tmp_path, tiny_teacher_dir):
    run = tmp_path / "run"
    first = run_cli("generate", "a red cube", "--teacher", str(tiny_teacher_dir), "--steps", "3", "--out", str(run),
                    "--no-video", "-q", *FAST)
    assert first.returncode == 0, first.stderr
    assert "page:" in first.stdout and (run / "index.html").is_file() and (run / "curves.png").is_file()
    log = read_log(run / "train_log.jsonl")
    assert [(r["group"], r["step"]) for r in log] == [("nerf", 1), ("nerf", 2), ("nerf", 3), ("texture", 1),
                                                       ("texture", 2), ("texture", 3)]
    assert all({"loss", "t", "grad", "seconds"} <= set(r) for r in log)
    curves_before = np.asarray(Image.open(run / "curves.png"))
    second = run_cli("generate", "--resume", str(run), "train.steps=5", "-q")
    assert second.returncode == 0, second.stderr
    log = read_log(run / "train_log.jsonl")
    # the first session's NeRF points are kept; the texture stage ran again on the longer NeRF
    assert [(r["group"], r["step"]) for r in log] == [("nerf", s) for s in range(1, 6)] + [("texture", s)
                                                                                          for s in range(1, 4)]
    assert not np.array_equal(curves_before, np.asarray(Image.open(run / "curves.png")))
    page = (run / "index.html").read_text()
    glb = next(run.glob("*.glb")).name
    assert f'src="{glb}"' in page and 'src="web/model-viewer.min.js"' in page and "curves.png" in page
    assert "a red cube" in page and "<h2>Config</h2>" in page
    assert not re.search(r'(src|href)="(https?:)?//', page), "the page must load nothing from the network"
    assert (run / "web" / "model-viewer.min.js").stat().st_size > 500_000
    assert (run / "web" / "LICENSE-model-viewer").is_file() and (run / "web" / "LICENSE-three").is_file()
    (run / "index.html").unlink()
    exported = run_cli("export", str(run), "--format", "glb", "--no-video")
    assert exported.returncode == 0, exported.stderr
    assert (run / "index.html").is_file()


def test_page_lists_particles_and_scores(tmp_path):
    for name in ("particle_0", "particle_1"):
        mesh_run_folder(tmp_path / name, "a red cube", "cube")
    (tmp_path / "run.json").write_text(json.dumps({"prompt": "a red cube", "seed": 3, "train_seconds": 12.5}))
    (tmp_path / "eval.json").write_text(json.dumps({"object_accuracy": 0.875, "silhouette_iou": 0.8123}))
    page = write_run_page(tmp_path).read_text()
    assert page.count("<model-viewer ") == 2 and "particle 0" in page and "particle 1" in page
    assert "0.875" in page and "0.8123" in page and "wall time</th><td>12.5 s" in page


def test_view_refuses_a_missing_folder_and_a_busy_port(tmp_path):
    missing = run_cli("view", str(tmp_path / "nope"), "--no-browser", timeout=60)
    assert missing.returncode != 0 and missing.stderr.strip().splitlines() == [
        f"error: run folder {tmp_path / 'nope'} does not exist"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = run_cli("view", str(tmp_path), "--port", str(port), "--no-browser", timeout=60)
    assert taken.returncode != 0 and taken.stderr.strip().splitlines() == [
        f"error: port {port} is in use; choose another with --port"]


@needs_browser
def test_served_page_draws_the_red_cube_in_chromium(tmp_path):
    run = mesh_run_folder(tmp_path / "run", "a red cube", "cube")
    (run / "run.json").write_text(json.dumps({"prompt": "a red cube", "seed": 0}))
    write_run_page(run)
    proc, url = serve_in_background(["view", str(run), "--port", "0", "--no-browser"])
    try:
        shot = tmp_path / "page.png"
        result = drive("page", url, shot)
    finally:
        proc.terminate()
        proc.wait(10)
    assert "failure" not in result, result.get("failure")
    assert result["console_errors"] == [] and result["outside_requests"] == []
    (viewer,) = result["viewers"]
    assert viewer["loaded"] and viewer["src"] == "asset.glb" and viewer["width"] >= 300
    image = np.asarray(Image.open(shot).convert("RGB"))
    centre, corner = region_mean(image, viewer), corner_mean(image, viewer)
    assert np.abs(corner - BACKGROUND).max() < 12, f"the viewer's background is {corner}"
    assert np.abs(centre - BACKGROUND).sum() > 150, f"nothing drawn at the centre: {centre}"
    r, g, b = centre
    assert r > 100 and r > g + 50 and r > b + 50, f"the centre is not the asset's red: {centre}"


def test_distill2d_folder_gets_curves_and_the_page(tmp_path, tiny_teacher_dir):
    out = tmp_path / "dmd"
    result = run_cli("distill2d", "--method", "dmd", "--teacher", str(tiny_teacher_dir), "--steps", "3", "--out",
                     str(out), "-q", "--no-eval", "batch_size=2", "regression.pairs=4", "regression.sampler_steps=2",
                     "real_images=8", "sample_every=2", "checkpoint_every=2", "log_every=1")
    assert result.returncode == 0, result.stderr
    log = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3] and all({"loss", "score_grad", "t", "seconds"} <= set(r) for r in log)
    page = (out / "index.html").read_text()
    assert "distill2d dmd" in page and "samples/step_000002.png" in page and "curves.png" in page
    assert "<model-viewer" not in page and not (out / "web").exists()  # no 3D asset, no viewer script
