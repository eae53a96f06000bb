"""scripts/compare_guidance.py: --jobs runs the prompts in child processes side by side, and the table reuses
their runs."""

import json
import subprocess
import sys

from tests.helpers import REPO


def test_jobs_split_the_prompts_and_the_table_reuses_the_runs(tiny_teacher_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue torus\n")
    out = tmp_path / "t"
    cmd = [sys.executable, str(REPO / "scripts" / "compare_guidance.py"), "--methods", "sds", "--teacher",
           str(tiny_teacher_dir), "--steps", "2", "--prompts", str(prompts), "--jobs", "2", "--out", str(out),
           "--override", "export.grid_resolution=32", "--override", "export.texture_size=64"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())
    assert [row["prompt"] for row in rows] == ["a red cube", "a blue torus"]
    assert all("volume_iou" in row for row in rows)
    made = {p.parent.name: p.stat().st_mtime for p in (out / "sds").glob("*/eval.json")}
    assert len(made) == 2
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # finished runs are reused
    assert again.returncode == 0 and {p.parent.name: p.stat().st_mtime for p in (out / "sds").glob("*/eval.json")} == made


def test_without_drops_options_and_their_values():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from compare_guidance import _without
    finally:
        sys.path.pop(0)
    assert _without(["--jobs", "2", "--out", "x", "--prompts=p.txt", "--quiet"], "--jobs", "--prompts") == [
        "--out", "x", "--quiet"]
