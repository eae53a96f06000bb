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


def test_truth_method_pulls_each_render_towards_the_worlds_own_render_from_its_camera():
    import torch

    from text3d.cameras import spherical_cameras
    from text3d.toyworld.render import render_objects

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from compare_guidance import TruthFit, TruthFitConfig
    finally:
        sys.path.pop(0)
    cams = spherical_cameras(torch.tensor([15.0, 30.0]), torch.tensor([0.0, 120.0]), torch.tensor([2.8, 2.8]),
                             torch.tensor([42.5, 42.5]))
    truth = render_objects("car", "green", cams, resolution=32)["rgb"]
    guide = TruthFit(None, TruthFitConfig(weight=0.5))
    images = (truth + 0.1 * torch.randn_like(truth)).requires_grad_(True)
    out = guide(images, ["a green car, front view", "a green car, side view"], cameras=cams)
    out.loss.backward()
    assert torch.allclose(images.grad, 0.5 * (images - truth).detach(), atol=1e-6)
    assert torch.allclose(out.grad, images.grad)
    # the other view's truth is not this one's: a render of the back scored against the front is far off
    swapped = guide(truth.flip(0).clone(), ["a green car, front view"] * 2, cameras=cams)
    assert float(swapped.loss) > 1.0 and float(guide(truth.clone(), ["a green car"] * 2, cameras=cams).loss) < 1e-8
