"""End to end: generate a NeRF asset with the tiny teacher and read every exported file back."""

import json

import imageio.v3 as iio
import pytest
import trimesh

from tests.helpers import FAST
from text3d.generate.config import load_config
from text3d.generate.run import generate


@pytest.fixture(scope="module")
def run(tiny_teacher_dir, tmp_path_factory):
    cfg = load_config(overrides=FAST + [f"teacher.name_or_path={tiny_teacher_dir}", "train.steps=6", "seed=3"])
    cfg.prompt = "a red cube"
    out = tmp_path_factory.mktemp("gen") / "run"
    return generate(cfg, out=out, show_progress=False)


def test_run_folder_has_every_file(run):
    names = {p.name for p in run.run_dir.iterdir()}
    assert {"config.yaml", "preview.png", "run.json", "checkpoints"} <= names
    summary = json.loads((run.run_dir / "run.json").read_text())
    assert summary["steps"] == 6 + 3 and summary["prompt"] == "a red cube"  # the NeRF's, then the texture stage's
    # the default's two stages: the front view pinned in the second; the NeRF's own mesh not exported (stage_meshes)
    assert (run.run_dir / "texture_reference.png").is_file() and not (run.run_dir / "stages").exists()
    # the export's time split: every part of the export, in seconds, none left among the files
    split = summary["export_seconds"]
    assert {"surface", "unwrap", "bake", "write", "preview"} <= set(split) and min(split.values()) >= 0
    assert "seconds" not in summary["files"] and "preview_seconds" not in summary["files"]
    assert not [p for p in run.run_dir.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("kind", ["obj", "glb"])
def test_exported_meshes_reload_with_uvs_and_texture(run, kind):
    path = run.files[kind]
    assert path.name.startswith("a-red-cube-")
    mesh = trimesh.load(path, force="mesh")
    assert len(mesh.faces) > 0
    assert mesh.visual.uv is not None and mesh.visual.uv.shape == (len(mesh.vertices), 2)
    material = mesh.visual.material
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    assert image is not None and image.size[0] >= 16


def test_turntable_and_preview(run):
    video = run.files["video"]
    frames = iio.imread(video)
    assert frames.shape[0] == 3
    preview = iio.imread(run.run_dir / "preview.png")
    assert preview.ndim == 3 and preview.shape[2] == 3 and preview.std() > 0


def test_unknown_words_of_the_embedded_teacher(tiny_teacher_dir, monkeypatch):
    from text3d.teacher import load_teacher
    from text3d.generate.run import unknown_words

    teacher = load_teacher(str(tiny_teacher_dir), "cpu")
    assert unknown_words(teacher, "a red xylophone") == []  # not the embedded teacher: open vocabulary
    monkeypatch.setattr("text3d.teacher.loader.DEFAULT_TEACHER_DIR", tiny_teacher_dir)
    assert unknown_words(teacher, "a red cube, front view") == []
    assert unknown_words(teacher, "a red xylophone") == ["xylophone"]


def test_opacity_entropy_pushes_translucent_pixels_to_solid_or_empty():
    import torch

    from text3d.generate.trainer import opacity_entropy

    solid_or_empty = torch.tensor([0.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 2)
    assert float(opacity_entropy(solid_or_empty)) < 1e-2
    half = torch.full((2, 1, 2, 2), 0.5)
    assert float(opacity_entropy(half)) == pytest.approx(4 * torch.log(torch.tensor(2.0)).item(), rel=1e-4)
    o = torch.tensor([0.3, 0.7]).view(1, 1, 1, 2).requires_grad_(True)
    opacity_entropy(o).backward()
    assert o.grad[0, 0, 0, 0] > 0 > o.grad[0, 0, 0, 1]  # descent lowers 0.3 towards 0 and raises 0.7 towards 1


def test_image_space_sds_with_opacity_loss_runs_end_to_end(tiny_teacher_dir, tmp_path):
    cfg = load_config(overrides=FAST + [f"teacher.name_or_path={tiny_teacher_dir}", "train.steps=3", "seed=1",
                                        "sds.space=image", "sds.guidance_scale=7.5", "train.lambda_opaque=0.5"])
    cfg.prompt = "a blue torus"
    result = generate(cfg, out=tmp_path / "run", show_progress=False)
    summary = json.loads((result.run_dir / "run.json").read_text())
    assert summary["steps"] == 3 + 3  # the NeRF's, then the texture stage's (tests.helpers.FAST)
    assert any(p.suffix == ".glb" for p in result.run_dir.iterdir())


def test_turntable_is_the_exported_mesh(run):
    """The video shows the asset the user downloads: its frames are the .glb rasterised at the orbit cameras, not
    the NeRF's volume rendering."""
    import numpy as np
    import torch

    from text3d.cameras import orbit_cameras
    from text3d.generate.finalize import turntable_frames
    from text3d.generate.run import load_run_config, load_stage_particles
    from text3d.renderers.mesh import MeshAsset, render_mesh

    cfg = load_run_config(run.run_dir)
    renderer = load_stage_particles(run.run_dir, cfg, torch.device("cpu"), ["nerf"])[0]
    video = iio.imread(run.files["video"]).astype(np.float32) / 255.0
    cams = orbit_cameras(cfg.camera, cfg.export.video_frames)
    res = cfg.export.video_resolution
    with torch.no_grad():
        mesh = render_mesh(MeshAsset.load(run.files["glb"]), cams, res, res)["rgb"].permute(0, 2, 3, 1).numpy()
    field = np.stack(turntable_frames(renderer, cfg, torch.device("cpu"))).astype(np.float32) / 255.0
    to_mesh, to_field = np.abs(video - mesh).mean(), np.abs(video - field).mean()
    assert to_mesh < 0.01 and to_mesh < 0.25 * to_field  # measured: 0.002 against 0.032, (to_mesh, to_field)
