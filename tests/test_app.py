"""`text3d app`: the checks of its form, and a served app driven through gradio_client (a job, a queued job told
its place, stop = Ctrl-C's path with the checkpoint kept, resume) and through headless Chromium (bad input as a
message, a 3-step job on the tiny test teacher shown in the 3D viewer, nothing loaded from outside localhost)."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser_helpers import corner_mean, drive, needs_browser, region_mean, serve_in_background
from helpers import FAST
from text3d.app.jobs import JobRequest, check_request, generate_args
from text3d.errors import UserError

FAST_OVERRIDES = " ".join(o for o in FAST if not o.startswith("train.preview_every"))
BACKGROUND = np.array([0xEE, 0xF0, 0xF3], dtype=float)


@pytest.mark.parametrize("changes, message", [
    ({"prompt": "  "}, "the prompt is empty"),
    ({"steps": 0}, "steps must be between 1 and 20000, got 0"),
    ({"steps": 50000}, "steps must be between 1 and 20000, got 50000"),
    ({"seed": -1}, "the seed must be 0 or more"),
    ({"guidance": "magic"}, "guidance must be one of sds, vsd"),
    ({"stages": "nerf;texture"}, "stages must be names separated by commas"),
    ({"overrides": "train.lr"}, "an override must be key=value"),
    ({"prompt": "a red ball"}, "the embedded teacher never saw the word(s) ball (did you mean"),
])
def test_the_form_refuses_bad_input_in_one_line(changes, message):
    with pytest.raises(UserError) as err:
        check_request(JobRequest(**{"prompt": "a red cube", **changes}))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_request_becomes_the_generate_command(tmp_path):
    req = check_request(JobRequest(prompt=" a  red cube ", guidance="vsd", steps=30, seed=2, stages="nerf,geometry",
                                   overrides="train.lr=0.01\nsds.guidance_scale=20", teacher="/some/teacher"))
    args = generate_args(req, tmp_path / "r")
    assert args[:2] == ["generate", "a red cube"]
    assert args[args.index("--guidance") + 1] == "vsd" and args[args.index("--stages") + 1] == "nerf,geometry"
    assert args[args.index("--teacher") + 1] == "/some/teacher" and args[-2:] == ["train.lr=0.01", "sds.guidance_scale=20"]


def test_the_form_starts_from_the_default_config():
    from text3d.generate.config import load_config

    cfg, req = load_config(), JobRequest(prompt="a red cube")
    assert (req.steps, req.stages) == (cfg.train.steps, ",".join(cfg.stages)) and req.stages == "nerf,texture"
    args = generate_args(check_request(req), Path("r"))
    assert args[args.index("--steps") + 1] == str(cfg.train.steps) and args[args.index("--stages") + 1] == "nerf,texture"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_teacher_dir, tmp_path_factory):
    pytest.importorskip("gradio", reason="the app extra is not installed (pip install -e \".[app]\")")
    out = tmp_path_factory.mktemp("app_runs")
    proc, url = serve_in_background(["app", "--teacher", str(tiny_teacher_dir), "--port", str(_free_port()),
                                     "--out", str(out)], pattern=r"http://127\.0\.0\.1:\d+/", timeout=180)
    yield url
    proc.terminate()
    proc.wait(60)


def _wait_for(job, pattern: str, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        outputs = job.outputs()
        if outputs and re.search(pattern, outputs[-1][0]):
            return outputs[-1][0]
        time.sleep(0.5)
    raise AssertionError(f"no status matching {pattern!r}; last: {job.outputs()[-1:]}")


def test_app_jobs_through_gradio_client(app_url):
    pytest.importorskip("gradio_client")
    from gradio_client import Client
    from gradio_client.utils import Status

    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="steps must be between 1 and 20000"):
        client.predict("a red cube", "sds", 0, 0, "nerf", "", api_name="/generate")
    long = client.submit("a red cube", "sds", 60, 0, "nerf", FAST_OVERRIDES, api_name="/generate")
    _wait_for(long, r"step [1-9]")
    queued = client.submit("a red cube", "sds", 3, 1, "nerf", FAST_OVERRIDES, api_name="/generate")
    deadline = time.time() + 30
    while queued.status().code != Status.IN_QUEUE and time.time() < deadline:
        time.sleep(0.2)
    status = queued.status()
    assert status.code == Status.IN_QUEUE and status.rank == 0, status  # told its place behind the running job
    assert "stopping" in client.predict(api_name="/stop")
    stopped, *_, run_dir = long.result(timeout=300)
    step = int(re.search(r"stopped\*\* at step (\d+)", stopped).group(1))
    assert 1 <= step < 60 and (Path(run_dir) / "checkpoints" / "last.pt").is_file()
    status, preview, viewer, files, done_dir = queued.result(timeout=300)
    assert status.startswith("**done**") and done_dir != run_dir
    assert {Path(f).suffix for f in files} >= {".glb", ".obj", ".mp4"}
    assert "<model-viewer" in viewer and ".glb" in viewer and Path(preview).is_file()
    status, *_ = client.predict(run_dir, step + 1, api_name="/resume")
    assert status.startswith(f"**done**: {step + 1} steps")
    assert re.search(r"no job is running", str(_raises(lambda: client.predict(api_name="/stop"))))


def _raises(fn) -> Exception:
    try:
        fn()
    except Exception as exc:  # gradio_client's AppError carries the page's message
        return exc
    raise AssertionError("no error")


@needs_browser
def test_app_in_chromium_runs_a_job_to_the_3d_viewer(app_url, tmp_path):
    import json

    shot = tmp_path / "app.png"
    result = drive("app", app_url, shot, json.dumps({"prompt": "a red cube", "steps": 3, "overrides": FAST_OVERRIDES}))
    assert "failure" not in result, result.get("failure")
    assert result["console_errors"] == [] and result["outside_requests"] == []
    assert result["bad_input"].startswith("the prompt is empty")
    assert result["status"].startswith("done: 6 steps")  # 3 of the NeRF, 3 of the default's texture stage (FAST)
    (viewer,) = result["viewers"]
    assert viewer["loaded"] and viewer["src"].endswith(".glb") and Path(result["run_dir"]).is_dir()
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert np.abs(corner_mean(image, viewer) - BACKGROUND).max() < 12
    assert np.abs(region_mean(image, viewer) - BACKGROUND).sum() > 60, "nothing drawn in the app's viewer"
