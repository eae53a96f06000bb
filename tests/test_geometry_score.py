"""The 3D score of `text3d eval run`: volumetric IoU, Chamfer distance and top-view IoU against the world's SDF."""

import json

import numpy as np
import pytest
import torch
import trimesh

from tests.helpers import mesh_run_folder, run_cli
from text3d.eval.geometry import geometry_scores, sdf_surface, yaw_matrix
from text3d.eval.judge import Judge
from text3d.eval.score_run import score_run
from text3d.toyworld.catalog import COLOURS, OBJECTS

CUBE = OBJECTS["cube"].sdf
SIDE = 0.68  # the world's cube: half size 0.34


def _box() -> trimesh.Trimesh:
    return trimesh.creation.box(extents=(SIDE, SIDE, SIDE))


def _drum() -> trimesh.Trimesh:
    """A cylinder of the cube's size standing on +Y (trimesh makes it along +Z): its top view is a disc."""
    drum = trimesh.creation.cylinder(radius=SIDE / 2, height=SIDE, sections=64)
    drum.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, (1, 0, 0)))
    return drum


@pytest.fixture(scope="module")
def box_scores():
    box = _box()
    return geometry_scores(box.vertices, box.faces, CUBE)


def test_truth_against_its_own_surface():
    v, f = sdf_surface(CUBE)
    s = geometry_scores(v, f, CUBE)
    assert s["volume_iou"] > 0.95 and s["top_iou"] > 0.95
    assert s["chamfer"] < 0.02  # sampling noise only: 4000 points a side, in units of the box diagonal
    # a mesh with holes (every 50th face dropped) is still inside where it should be: the 3-axis vote
    keep = np.ones(len(f), dtype=bool)
    keep[::50] = False
    assert geometry_scores(v, f[keep], CUBE)["volume_iou"] > 0.95


def test_a_drum_scores_worse_than_a_box_against_the_cube(box_scores):
    drum = _drum()
    assert np.allclose(drum.extents, SIDE)  # same bounding box as the cube: only the shape differs
    d = geometry_scores(drum.vertices, drum.faces, CUBE)
    assert box_scores["top_iou"] > 0.95 and d["top_iou"] < 0.85  # a disc in its square: ~pi/4
    assert box_scores["volume_iou"] > 0.95 and d["volume_iou"] < 0.85
    assert d["chamfer"] > 2 * box_scores["chamfer"]


def test_a_turned_cube_scores_as_well_as_an_upright_one(box_scores):
    box = _box()
    turned = geometry_scores(box.vertices @ yaw_matrix(30.0).T, box.faces, CUBE)
    for key in ("volume_iou", "top_iou"):
        assert turned[key] > box_scores[key] - 0.02
    assert turned["chamfer"] < box_scores["chamfer"] + 0.005
    # without the yaw sweep the turned cube's top view (a square turned by 30 degrees) would not match
    no_sweep = geometry_scores(box.vertices @ yaw_matrix(30.0).T, box.faces, CUBE, yaw_step=360.0)
    assert no_sweep["top_iou"] < turned["top_iou"] - 0.05


def test_eval_run_writes_the_3d_scores(tmp_path):
    torch.manual_seed(0)
    judge = Judge(list(OBJECTS), list(COLOURS), ["front", "side", "back", "overhead"])
    good = score_run(mesh_run_folder(tmp_path / "a", "a red cube", "cube"), judge=judge)
    bad = score_run(mesh_run_folder(tmp_path / "b", "a red cube", "cylinder"), judge=judge)
    saved = json.loads((tmp_path / "a" / "eval.json").read_text())
    for key in ("volume_iou", "chamfer", "top_iou"):
        assert saved[key] == good[key]
    assert good["volume_iou"] > 0.9 and good["top_iou"] > 0.9
    assert bad["top_iou"] < good["top_iou"] - 0.1


def test_cli_prints_the_3d_scores(tmp_path):
    folder = mesh_run_folder(tmp_path, "a green sphere", "sphere")
    r = run_cli("eval", "run", str(folder))
    assert r.returncode == 0, r.stderr
    assert "volume IoU" in r.stdout and "top-view IoU" in r.stdout
    assert {"volume_iou", "chamfer", "top_iou"} <= set(json.loads((folder / "eval.json").read_text()))


def test_a_torus_with_its_hole_open_against_one_closed_by_a_membrane():
    """The top-view hole score: 1 for the world's torus, 0 when a disc fills its hole, None for a cube."""
    torus = OBJECTS["torus"].sdf
    v, f = sdf_surface(torus)
    open_ring = geometry_scores(v, f, torus)
    membrane = trimesh.util.concatenate([trimesh.Trimesh(v, f),
                                         trimesh.creation.cylinder(radius=0.3, height=0.02, sections=48).apply_transform(
                                             trimesh.transformations.rotation_matrix(np.pi / 2, (1, 0, 0)))])
    closed = geometry_scores(membrane.vertices, membrane.faces, torus)
    assert open_ring["top_hole"] > 0.95 and closed["top_hole"] < 0.05
    assert open_ring["top_iou"] > closed["top_iou"] + 0.05
    box = _box()
    assert geometry_scores(box.vertices, box.faces, CUBE)["top_hole"] is None
