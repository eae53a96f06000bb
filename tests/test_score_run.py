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
    assert result["janus_rate"] is not None and result["janus_views"] == 2  # azimuth 0 and 180 are clear views


def test_clear_views_and_bad_prompts(tmp_path, judge):
    cfg = CameraSamplerConfig()
    assert clear_front_back(15, 0, cfg) == "front" and clear_front_back(15, 180, cfg) == "back"
    assert clear_front_back(15, 45, cfg) is None and clear_front_back(15, 90, cfg) is None
    folder = mesh_run_folder(tmp_path, "a dragon made of glass", "cube")
    with pytest.raises(UserError, match="not an embedded-world caption"):
        score_run(folder, judge=judge)
