"""Headless Chromium for the tests: Debian's ``chromium`` driven by playwright-core (``.tools``, installed by
``.ci/run`` with npm; no browser download), through ``tests/browser/drive.cjs``. Tests that need it skip with the
reason when either is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO

DRIVER = REPO / "tests" / "browser" / "drive.cjs"
PLAYWRIGHT = REPO / ".tools" / "node_modules" / "playwright-core"


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    if chromium_path() is None:
        return "no chromium (.ci/run installs it with apt-get install -y chromium when run as root)"
    if shutil.which("node") is None:
        return "no node (playwright-core drives chromium from node)"
    if not (PLAYWRIGHT / "package.json").is_file():
        return "no playwright-core in .tools (npm install --prefix .tools playwright-core, as .ci/run does)"
    return None


needs_browser = pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))


def drive(mode: str, url: str, shot: Path, *extra: str, timeout: float = 420) -> dict:
    """Run the driver; its JSON result (``failure`` set when a step in the browser failed)."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        env = dict(os.environ, TEXT3D_PLAYWRIGHT=str(PLAYWRIGHT), CHROMIUM=str(chromium_path()), PROFILE=profile)
        proc = subprocess.run(["node", str(DRIVER), mode, url, str(shot), *extra], capture_output=True, text=True,
                              timeout=timeout, env=env)
    assert proc.returncode == 0 and proc.stdout.strip(), f"driver failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def serve_in_background(args: list[str], pattern: str = r"http://127\.0\.0\.1:(\d+)/", timeout: float = 120,
                        env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start ``python -m text3d ARGS`` and wait for the address it prints; (process, url)."""
    proc = subprocess.Popen([sys.executable, "-m", "text3d", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return proc, match.group(0)
    proc.kill()
    raise AssertionError(f"no address printed by text3d {' '.join(args)}:\n{''.join(seen)}")


def region_mean(image: np.ndarray, box: dict, frac: float = 0.08) -> np.ndarray:
    """Mean RGB of a square patch (``frac`` of the box's width) at the centre of ``box`` (CSS px = image px)."""
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    half = max(2, int(box["width"] * frac / 2))
    patch = image[int(cy) - half:int(cy) + half, int(cx) - half:int(cx) + half, :3]
    return patch.reshape(-1, 3).astype(float).mean(0)


def corner_mean(image: np.ndarray, box: dict, inset: int = 8, size: int = 12) -> np.ndarray:
    """Mean RGB of a patch near the top-left corner of ``box`` (the viewer's background)."""
    x, y = int(box["x"]) + inset, int(box["y"]) + inset
    return image[y:y + size, x:x + size, :3].reshape(-1, 3).astype(float).mean(0)
