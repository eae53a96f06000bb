"""`text3d eval run`: silhouettes of an exported mesh against the world's ground truth, per view."""

import json

import pytest
import torch

from tests.helpers import mesh_run_folder
from text3d.errors import UserError
from text3d.eval.judge import Judge
from text3d.eval.score_run import clear_front_back, score_run
from text3d.cameras import CameraSamplerConfig
from text3d.toyworld.catalog import COLOURS, OBJECTS


@pytest.fixture(scope="module")
def judge():
    torch.manual_seed(0)
    return Judge(list(OBJECTS), list(COLOURS), ["front", "side", "back", "overhead"])


def test_matching_mesh_has_high_iou_and_wrong_shape_low(tmp_path, judge):
    good = score_run(mesh_run_folder(tmp_path / "a", "a red cube", "cube"), judge=judge)
    bad = score_run(mesh_run_folder(tmp_path / "b", "a red cube", "sphere"), judge=judge)
    assert good["silhouette_iou"] > 0.9
    assert bad["silhouette_iou"] < good["silhouette_iou"] - 0.05
    assert good["views"] == 8 and len(good["predicted"]["object"]) == 8
    assert good["janus_rate"] is None  # a cube has no front and back
    saved = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert saved["silhouette_iou"] == good["silhouette_iou"]


def test_front_back_objects_get_a_janus_rate(tmp_path, judge):
    result = score_run(mesh_run_folder(tmp_path, "a red house", "house"), judge=judge)
    assert result["janus_rate_all_views"] is not None  # azimuth 0 and 180 are clear views
    assert result["janus_views"] + result["janus_truth_misreads"] == 2


@pytest.mark.parametrize("mesh_front, mesh_back, truth_back, rate, all_views, views", [
    ("front", "back", "back", 0.0, 0.0, 2),     # right on both views
    ("front", "front", "back", 0.5, 0.5, 2),    # the back seen as a front: Janus on 1 of 2 views
    ("front", "front", "front", 0.0, 0.5, 1),   # ... but the judge calls the truth's back a front too: left out
    ("back", "front", "front", 1.0, 1.0, 1),    # the front seen as a back still counts
])
def test_janus_counts_only_views_the_judge_reads_right_on_the_truth(tmp_path, judge, monkeypatch, mesh_front,
                                                                     mesh_back, truth_back, rate, all_views, views):
    from text3d.eval import score_run as module

    real = module.score_predictions
    calls = []

    def fake(judge_, images, *args):  # the mesh's views are scored first, then the truth's (score_mesh)
        out = real(judge_, images, *args)
        front, back = (mesh_front, mesh_back) if not calls else ("front", truth_back)
        calls.append(1)
        out["predicted"]["view"] = [front, "side", "side", "side", back, "side", "side", "side"]
        return out

    monkeypatch.setattr(module, "score_predictions", fake)
    result = score_run(mesh_run_folder(tmp_path, "a red house", "house"), judge=judge)
    assert len(calls) == 2
    assert result["janus_rate"] == rate and result["janus_rate_all_views"] == all_views
    assert result["janus_views"] == views and result["janus_truth_misreads"] == 2 - views


def test_clear_views_and_bad_prompts(tmp_path, judge):
    cfg = CameraSamplerConfig()
    assert clear_front_back(15, 0, cfg) == "front" and clear_front_back(15, 180, cfg) == "back"
    assert clear_front_back(15, 45, cfg) is None and clear_front_back(15, 90, cfg) is None
    folder = mesh_run_folder(tmp_path, "a dragon made of glass", "cube")
    with pytest.raises(UserError, match="not an embedded-world caption"):
        score_run(folder, judge=judge)
