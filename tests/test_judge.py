"""The judge (training, save/load), the Fréchet distance, and scoring images against their prompts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from text3d.errors import UserError
from text3d.eval.frechet import feature_stats, frechet_distance, frechet_distance_features
from text3d.eval.judge import HEADS, Judge, JudgeTrainConfig, augment_batch, train_judge
from text3d.toyworld.dataset import ToyworldDataset, shard_name, write_meta, write_shard

OBJECTS = ["square", "circle", "triangle"]
COLOURS = ["red", "green", "blue"]
VIEWS = ["front", "side", "back", "overhead"]
RGB = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230)}
SMALL = dict(image_size=32, channels=(8, 16, 32), embed_dim=32, batch_size=32, lr=1e-2, warmup=20)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_fake_dataset(folder: Path, n: int = 240, resolution: int = 32, seed: int = 0) -> Path:
    """Coloured squares / circles / triangles on grey; a dark dot marks the view (front: top-left,
    back: bottom-right; only front and back occur). Two shards, written with the real format."""
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[0:resolution, 0:resolution] + 0.5) / resolution
    obj, col = rng.integers(0, 3, n), rng.integers(0, 3, n)
    view = rng.choice([0, 2], n)
    images = np.zeros((n, resolution, resolution, 3), np.uint8)
    for i in range(n):
        cx, cy = 0.5 + rng.uniform(-0.06, 0.06, 2)
        r = rng.uniform(0.26, 0.34)
        dx, dy = (xx - cx) / r, (yy - cy) / r
        mask = [np.maximum(abs(dx), abs(dy)) < 1, dx**2 + dy**2 < 1, (dy < 1) & (abs(dx) < (dy + 1) / 2)][obj[i]]
        img = np.where(mask[..., None], np.array(RGB[COLOURS[col[i]]], float), np.array([190.0, 190, 195]))
        px, py = (-0.45, -0.45) if view[i] == 0 else (0.45, 0.45)
        img = np.where((((dx - px) ** 2 + (dy - py) ** 2) < 0.08)[..., None], 20.0, img)
        images[i] = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    captions = np.array([f"a {COLOURS[c]} {OBJECTS[o]}, {VIEWS[v]} view" for o, c, v in zip(obj, col, view)])
    zeros = np.zeros(n, np.float32)
    arrays = dict(images=images, captions=captions, object=obj.astype(np.int16), colour=col.astype(np.int16),
                  view=view.astype(np.int8), elevation=zeros, azimuth=zeros, radius=zeros, fovy=zeros)
    half = n // 2
    folder.mkdir(parents=True, exist_ok=True)
    for k, sl in enumerate([slice(0, half), slice(half, n)]):
        write_shard(folder / shard_name(k), {key: v[sl] for key, v in arrays.items()})
    write_meta(folder, dict(seed=seed, n=n, resolution=resolution, objects=OBJECTS, colours=COLOURS,
                            view_labels=VIEWS, shards=[shard_name(0), shard_name(1)]))
    return folder


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    return make_fake_dataset(tmp_path_factory.mktemp("fake_world") / "data")


@pytest.fixture(scope="module")
def trained(dataset_dir):
    data = ToyworldDataset.load(dataset_dir)
    judge, report = train_judge(data, steps=400, seed=0, holdout=0.2, **SMALL)
    return judge, report


# ------------------------------------------------------------------ the judge


def test_judge_learns_the_fake_world(trained):
    judge, report = trained
    assert report["n_train"] == 192 and report["n_holdout"] == 48
    for head in HEADS:
        assert report["train_accuracy"][head] >= 0.97, report
    assert report["holdout_accuracy"]["object"] >= 0.8 and report["holdout_accuracy"]["colour"] >= 0.9, report
    assert 1000 < report["n_parameters"] < 50_000
    assert not judge.training


def test_judge_default_size_and_feature_shape():
    judge = Judge(OBJECTS, COLOURS, VIEWS)
    n_params = sum(p.numel() for p in judge.parameters())
    assert 100_000 <= n_params <= 300_000, n_params
    judge.eval()
    x = torch.rand(2, 3, 96, 96)  # any size: resized to 64
    out = judge(x)
    assert [out[h].shape[1] for h in HEADS] == [3, 3, 4]
    assert judge.features(x).shape == (2, 128)


def test_judge_save_load_is_bit_exact(trained, tmp_path):
    judge, _ = trained
    judge.save(tmp_path / "j", info={"note": "test"})
    loaded = Judge.load(tmp_path / "j")
    assert loaded.labels == judge.labels and loaded.info == {"note": "test"}
    a, b = judge.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ra, rb = judge.run(x), loaded.run(x)
    assert all(torch.equal(ra[k], rb[k]) for k in ra)
    assert json.loads((tmp_path / "j" / "config.json").read_text())["objects"] == OBJECTS


def test_judge_load_errors_are_one_line(tmp_path, trained):
    for folder in (tmp_path / "missing", tmp_path):
        with pytest.raises(UserError) as exc:
            Judge.load(folder)
        assert "\n" not in str(exc.value)
    trained[0].save(tmp_path / "j")
    (tmp_path / "j" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="corrupt"):
        Judge.load(tmp_path / "j")


def test_augmentation_never_mirrors():
    """Zero-strength augmentation is the identity; shifts move content but never flip it left-right."""
    x = torch.zeros(1, 3, 32, 32)
    x[..., 8:12, 4:10] = 1.0  # a bar on the left
    g = torch.Generator().manual_seed(0)
    none = JudgeTrainConfig(max_shift=0.0, scale_range=(1.0, 1.0), brightness=0.0)
    assert torch.allclose(augment_batch(x, none, g), x, atol=1e-5)
    out = augment_batch(x.expand(64, -1, -1, -1), JudgeTrainConfig(), g)
    mass_x = (out[:, 0].sum(1) * torch.arange(32.0)).sum(-1) / out[:, 0].sum((1, 2))
    assert bool((mass_x < 12).all())  # the bar stays on the left (x ~ 6.5 +- shift and scale)


# ------------------------------------------------------------------ Fréchet distance


def test_frechet_identical_sets_is_zero():
    f = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance_features(f, f) < 1e-6
    assert frechet_distance_features(f, f + 1.0) == pytest.approx(16.0, rel=1e-5)  # shifted mean only


def test_frechet_matches_closed_forms():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)
    # commuting (diagonal) covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(5.0 + 4.0 + 1.0 + 0.0)
    # non-commuting 2x2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = S1 S2 with positive eigenvalues
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    m = s1 @ s2
    tr_sqrt = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    expected = 2.0 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance([1.0, 1.0], s1, [0.0, 0.0], s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_of_samples_from_two_gaussians():
    rng = np.random.default_rng(0)
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    x = rng.multivariate_normal([1.0, 1.0], s1, size=40000)
    y = rng.multivariate_normal([0.0, 0.0], s2, size=40000)
    mu, cov = feature_stats(x)
    assert np.allclose(mu, [1, 1], atol=0.03) and np.allclose(cov, s1, atol=0.05)
    exact = frechet_distance([1.0, 1.0], s1, [0.0, 0.0], s2)
    assert frechet_distance_features(x, y) == pytest.approx(exact, rel=0.03)


def test_frechet_fewer_samples_than_dimensions_is_finite():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 32, generator=g), torch.randn(12, 32, generator=g)
    d = frechet_distance_features(a, b)
    assert np.isfinite(d) and d > 0
    with pytest.raises(ValueError):
        frechet_distance_features(a[:1], b)


# ------------------------------------------------------------------ scoring images


def write_sample_folder(folder: Path, images: np.ndarray, prompts: list[str]) -> Path:
    """A folder in `text3d sample`'s format from uint8 [N, R, R, 3] images."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        Image.fromarray(img).save(folder / f"images/{i:05d}.png")
        records.append({"file": f"images/{i:05d}.png", "prompt": str(prompt)})
    (folder / "prompts.json").write_text(json.dumps({"images": records, "model": "fake", "steps": 0,
                                                    "guidance_scale": 0, "seed": 0}))
    return folder


@pytest.fixture()
def no_catalog(monkeypatch):
    """Use the fallback parser whatever text3d.toyworld.catalog says about the real world."""
    monkeypatch.setattr("text3d.eval.score_images._catalog_parser", lambda: None)


def test_parse_prompt_fallback(no_catalog):
    from text3d.eval.score_images import parse_prompt

    assert parse_prompt("a red square, front view", OBJECTS, COLOURS, VIEWS) == ("square", "red", "front")
    assert parse_prompt("A  Blue   circle", OBJECTS, COLOURS, VIEWS) == ("circle", "blue", None)
    assert parse_prompt("an green triangle, overhead view.", OBJECTS, COLOURS, VIEWS) == ("triangle", "green",
                                                                                         "overhead")
    assert parse_prompt("a purple square, back view", OBJECTS, COLOURS, VIEWS) == (None, None, "back")
    assert parse_prompt("a red square on a table", OBJECTS, COLOURS, VIEWS)[:2] == (None, None)


def test_score_predictions_counts_only_what_is_expected(trained):
    judge, _ = trained
    outputs = {"object": torch.tensor([0, 1, 2]), "colour": torch.tensor([0, 0, 0]), "view": torch.tensor([0, 2, 0]),
               "features": torch.zeros(3, 32)}
    from text3d.eval.score_images import score_predictions

    s = score_predictions(judge, None, ["square", 1, "circle"], ["red", "red", None], [None, "back", "back"],
                          outputs=outputs)
    assert s["object_accuracy"] == pytest.approx(2 / 3) and s["n_object"] == 3
    assert s["colour_accuracy"] == 1.0 and s["n_colour"] == 2
    assert s["view_accuracy"] == 0.5 and s["n_view"] == 2
    assert s["joint_accuracy"] == 1.0  # images 0 and 1 have both; both right
    assert s["predicted"]["view"] == ["front", "back", "front"]
    assert score_predictions(judge, None, ["square"] * 3, ["red"] * 3, None, outputs=outputs)["view_accuracy"] is None
    with pytest.raises(ValueError):
        score_predictions(judge, None, ["sphere"] * 3, ["red"] * 3, None, outputs=outputs)


def test_front_back_view_accuracy_counts_only_front_back_objects():
    from text3d.eval.score_images import front_back_view_accuracy

    got = front_back_view_accuracy([True, False, True, None, False], ["house", "car", "sphere", "mug", None])
    assert got == {"view_accuracy_front_back": 0.5, "n_view_front_back": 2}
    assert front_back_view_accuracy([True], ["cube"]) == {"view_accuracy_front_back": None, "n_view_front_back": 0}


def test_score_folder_ground_truth_vs_shuffled(trained, dataset_dir, tmp_path, no_catalog):
    from text3d.eval.score_images import score_folder

    judge, _ = trained
    data = ToyworldDataset.load(dataset_dir)
    idx = np.arange(0, 240, 4)  # 60 renders, from both splits
    captions = [str(c) for c in data.arrays["captions"][idx]]
    images = data.arrays["images"][idx]
    truth = score_folder(write_sample_folder(tmp_path / "truth", images, captions), judge=judge,
                         reference=dataset_dir)
    assert truth["n_scored"] == 60 and truth["n_view"] == 60
    assert truth["object_accuracy"] == 1.0 and truth["colour_accuracy"] == 1.0, truth
    assert truth["view_accuracy"] >= 0.95
    assert json.loads((tmp_path / "truth" / "scores.json").read_text())["object_accuracy"] == 1.0

    shuffled = [captions[i] for i in np.random.default_rng(0).permutation(60)]
    mixed = score_folder(write_sample_folder(tmp_path / "mixed", images, shuffled), judge=judge)
    assert mixed["object_accuracy"] < 0.6 and mixed["colour_accuracy"] < 0.6, mixed
    assert mixed["frechet_distance"] is None

    noise = np.random.default_rng(1).integers(0, 256, images.shape, dtype=np.uint8)
    bad = score_folder(write_sample_folder(tmp_path / "noise", noise, captions), judge=judge, reference=dataset_dir)
    assert truth["frechet_distance"] >= 0 and bad["frechet_distance"] > 5 * truth["frechet_distance"]
    assert truth["n_reference"] == 240


def test_reference_reports_the_judges_own_view_accuracy_on_ground_truth(trained, dataset_dir, monkeypatch):
    """The ceiling printed beside a sample's view accuracy is the judge's view accuracy on the reference's
    renders, over all of them and over the front/back objects alone (here: the fake world's circles)."""
    from text3d.eval.score_images import reference_outputs

    judge, _ = trained
    monkeypatch.setattr("text3d.toyworld.catalog.FRONT_BACK_OBJECTS", ["circle"])
    data = ToyworldDataset.load(dataset_dir)
    predicted = judge.run(data.images())["view"].numpy()
    truth = np.array([judge.index("view", VIEWS[v]) for v in data.arrays["view"]])
    circles = data.arrays["object"] == OBJECTS.index("circle")
    ref = reference_outputs(judge, dataset_dir)
    assert ref["n"] == 240 and ref["features"].shape == (240, judge.embed_dim)
    assert ref["view_accuracy"] == pytest.approx(float((predicted == truth).mean()))
    assert ref["view_accuracy_front_back"] == pytest.approx(float((predicted == truth)[circles].mean()))
    assert ref["n_view_front_back"] == int(circles.sum())
    # a judge that always says "side" (no image of this world has that view) scores 0 on ground truth
    side_only = copy.deepcopy(judge)
    with torch.no_grad():
        side_only.heads["view"].weight.zero_()
        side_only.heads["view"].bias.copy_(torch.tensor([-9.0, 9.0, -9.0, -9.0]))
    assert reference_outputs(side_only, dataset_dir, max_images=100)["view_accuracy"] == 0.0


def test_eval_images_command(trained, dataset_dir, tmp_path, monkeypatch, no_catalog):
    from text3d.eval.cli import eval_app

    judge, _ = trained
    judge.save(tmp_path / "judge")
    data = ToyworldDataset.load(dataset_dir)
    folder = write_sample_folder(tmp_path / "s", data.arrays["images"][:8],
                                 [str(c).split(",")[0] for c in data.arrays["captions"][:8]])
    runner = CliRunner()
    r = runner.invoke(eval_app, ["images", str(folder), "--judge", str(tmp_path / "judge"),
                                 "--reference", str(dataset_dir)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "object accuracy" in r.output and "Fréchet" in r.output
    scores = json.loads((folder / "scores.json").read_text())
    assert scores["view_accuracy"] is None and scores["n_view"] == 0 and len(scores["per_image"]) == 8

    monkeypatch.setattr("text3d.eval.score_images.DEFAULT_JUDGE_DIR", tmp_path / "nowhere")
    r = runner.invoke(eval_app, ["images", str(folder)])
    assert isinstance(r.exception, UserError) and "\n" not in str(r.exception)
    r = runner.invoke(eval_app, ["images", str(tmp_path), "--judge", str(tmp_path / "judge")])
    assert isinstance(r.exception, UserError) and "prompts.json" in str(r.exception)


def test_train_judge_script(dataset_dir, tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "judge"
    r = subprocess.run([sys.executable, str(repo / "scripts" / "train_judge.py"), "--data", str(dataset_dir),
                        "--out", str(out), "--steps", "5", "--seed", "1", "--quiet", "--threads", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    card = (out / "README.md").read_text()
    assert "Held-out accuracy" in card and "--steps 5 --seed 1" in card and "| object |" in card
    judge = Judge.load(out)
    assert judge.info["n_holdout"] == 24 and set(judge.info["holdout_accuracy"]) == set(HEADS)
