"""Chained stages: NeRF -> DMTet geometry -> surface texture in one command, restart of one stage from
another run, and a texture baked from a known function that re-renders to the same image."""

import json

import numpy as np
import pytest
import torch
import trimesh

from tests.helpers import REPO, run_cli
from text3d.cameras import spherical_cameras
from text3d.export import ExportConfig, export_textured_mesh
from text3d.renderers.mesh import MeshAsset, render_mesh

pytestmark = pytest.mark.usefixtures("one_thread")

STAGE_ARGS = ["-q", "--no-video", "train.resolution=32", "geometry.steps=3", "geometry.grid_resolution=24",
              "texture.steps=3", "texture.resolution=32", "export.texture_size=128", "export.grid_resolution=48",
              "sds.guidance_scale=10", "train.checkpoint_every=3", "train.preview_every=1000"]


def test_three_stages_in_one_command_then_texture_from_that_run(tiny_teacher_dir, tmp_path):
    run = tmp_path / "run"
    result = run_cli("generate", "a yellow house", "--teacher", str(tiny_teacher_dir), "--steps", "4",
                     "--stages", "nerf,geometry,texture", "--out", str(run), *STAGE_ARGS, "export.stage_meshes=true")
    assert result.returncode == 0, result.stderr
    for name in ("last.pt", "geometry.pt", "texture.pt"):
        assert (run / "checkpoints" / name).is_file()
    summary = json.loads((run / "run.json").read_text())
    assert summary["steps"] == 4 + 3 + 3
    # with export.stage_meshes the stages a later one continues are exported too, each in its own viewer on the run page
    assert [len(list((run / "stages" / s).glob("*.glb"))) for s in ("nerf", "geometry")] == [1, 1]
    assert (run / "index.html").read_text().count("<model-viewer ") == 3
    glb = next(run.glob("*.glb"))
    mesh = trimesh.load(glb, force="mesh")
    assert mesh.visual.material.baseColorTexture.size == (128, 128) and len(mesh.faces) > 100
    from text3d.export.validate import validate_gltf, validator_node_path

    if validator_node_path() is not None:
        assert validate_gltf([glb])[0]["errors"] == 0

    # scripts/stage_table.py scores the run's NeRF stage (exported on its own) against its final stage
    import importlib.util

    spec = importlib.util.spec_from_file_location("stage_table", REPO / "scripts" / "stage_table.py")
    stage_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage_table)
    assert stage_table.main([str(run), "--out", str(tmp_path / "table.md")]) == 0
    nerf_glb = next((run / "stage_nerf").glob("*.glb"))
    assert len(trimesh.load(nerf_glb, force="mesh").faces) != len(mesh.faces)  # marching cubes, not the DMTet
    rows = (tmp_path / "table.md").read_text().splitlines()
    assert [r.split(" | ")[1] for r in rows[2:4]] == ["NeRF", "NeRF + geometry + texture"]
    assert all(json.loads((d / "eval.json").read_text())["prompt"] == "a yellow house" for d in (run, run / "stage_nerf"))

    again = tmp_path / "again"
    result = run_cli("generate", "a yellow house", "--teacher", str(tiny_teacher_dir), "--stages", "texture",
                     "--from", str(run), "--out", str(again), *STAGE_ARGS)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (again / "checkpoints").iterdir()) == ["texture.pt"]
    assert list(again.glob("*.glb"))
    bad = run_cli("generate", "a yellow house", "--teacher", str(tiny_teacher_dir), "--stages", "geometry,nerf",
                  "--out", str(tmp_path / "bad"), *STAGE_ARGS)
    assert bad.returncode == 2 and "stages must be an ordered subset" in bad.stderr


def test_texture_baked_from_a_known_function_re_renders_to_the_same_image(tmp_path):
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.7)

    def colour(points):
        return (0.5 + 0.5 * torch.sin(3.0 * points)).clamp(0, 1)

    files = export_textured_mesh(sphere, colour, tmp_path, "ball", ExportConfig(texture_size=512, seam_padding=4),
                                 formats=("glb",))
    baked = MeshAsset.load(files["glb"])
    cams = spherical_cameras(torch.tensor([10.0, 40.0]), torch.tensor([30.0, 200.0]), 2.5, 40.0)
    truth = render_mesh(MeshAsset(torch.as_tensor(sphere.vertices, dtype=torch.float32),
                                  torch.as_tensor(sphere.faces)), cams, 64, 64, shading="albedo", albedo_fn=colour)
    again = render_mesh(baked, cams, 64, 64, shading="albedo")
    inside = (truth["opacity"] > 0.99) & (again["opacity"] > 0.99)
    err = (truth["rgb"] - again["rgb"]).abs().amax(dim=1, keepdim=True)[inside]
    assert inside.sum() > 1000 and float(err.mean()) < 0.02 and float(err.quantile(0.99)) < 0.1


def test_mesh_stage_export_drops_small_floating_pieces(tmp_path):
    """A surface model's export drops pieces below export.min_component_fraction, as marching cubes does."""
    from torch import nn

    from text3d.generate.config import load_config
    from text3d.renderers.dmtet import SurfaceMesh
    from text3d.renderers.mesh_stages import MeshStageModel
    from text3d.generate.finalize import export_particle

    body = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    speck = trimesh.creation.icosphere(subdivisions=0, radius=0.05)  # 20 faces, under 5% of the body's 1280
    speck.apply_translation([0.8, 0.8, 0.0])
    both = trimesh.util.concatenate([body, speck])

    class Albedo(nn.Module):
        def query_albedo(self, points):
            return torch.full((points.shape[0], 3), 0.5)

    class SurfaceModel(MeshStageModel):  # a surface and a colour field; export comes from the base
        def surface(self, export=None):
            return SurfaceMesh(torch.as_tensor(both.vertices, dtype=torch.float32), torch.as_tensor(both.faces))

        def colour_field(self):
            return Albedo()

    cfg = load_config(overrides=["export.texture_size=64", "export.max_faces=0"])
    cfg.run_name = "floater"
    files = export_particle(SurfaceModel(), cfg, torch.device("cpu"), tmp_path, formats=("glb",), video=False)
    mesh = trimesh.load(files["glb"], force="mesh")
    assert len(mesh.faces) == len(body.faces)
    assert float(np.abs(mesh.bounds).max()) < 0.55  # the speck at (0.8, 0.8, 0) is gone
