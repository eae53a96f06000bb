"""The synthetic world: catalog and captions, rendering (silhouettes, colours, front/back, shading), the
dataset render (reproducibility, labels, balance, resume) and the `toyworld` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from text3d.cameras import VIEW_LABELS, CameraSamplerConfig, orbit_cameras, spherical_cameras, view_label
from text3d.errors import UserError
from text3d.prompts import VIEW_SUFFIXES
from text3d.toyworld import generate
from text3d.toyworld.catalog import (COLOURS, FRONT_BACK_OBJECTS, OBJECTS, all_captions, caption, eval_prompts,
                                     parse_caption, view_eval_prompts, view_suffix_label, vocabulary)
from text3d.toyworld.cli import toyworld_app
from text3d.toyworld.dataset import ToyworldDataset, read_meta
from text3d.toyworld.generate import render_dataset
from text3d.toyworld.render import render_objects

CFG = CameraSamplerConfig()
PRIMITIVES = ["sphere", "cube", "cylinder", "cone", "torus", "pyramid", "capsule", "octahedron"]


pytestmark = pytest.mark.usefixtures("one_thread")


def eval_cams(azimuths, elevation=None):
    el = CFG.eval_elevation if elevation is None else elevation
    return spherical_cameras(el, torch.tensor([float(a) for a in azimuths]), CFG.eval_radius, CFG.eval_fovy)


def files_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard_*.npz"))}


# ------------------------------------------------------------------------------------------------ catalog
def test_catalog_has_the_promised_objects_and_colours():
    assert set(PRIMITIVES) <= set(OBJECTS)
    assert {"snowman", "house", "mug"} <= set(FRONT_BACK_OBJECTS)
    assert all(OBJECTS[name].front_back for name in FRONT_BACK_OBJECTS)
    assert len(COLOURS) >= 8 and "white" not in COLOURS
    for rgb in COLOURS.values():
        assert len(rgb) == 3 and all(0.0 <= c <= 1.0 for c in rgb)
        assert min(rgb) < 0.6  # stays visible on the white background
    # multi-part objects: fixed secondary colours stay fixed
    parts = {p.name: p for p in OBJECTS["snowman"].parts}
    assert parts["nose"].colour is not None and parts["nose"].colour[0] > 0.9 and parts["nose"].colour[2] < 0.1
    assert {p.name: p for p in OBJECTS["house"].parts}["door"].colour is not None


def test_captions_parse_back_with_and_without_view_suffix():
    captions = all_captions()
    assert len(captions) == len(set(captions)) == len(OBJECTS) * len(COLOURS)
    for obj in OBJECTS:
        for colour in COLOURS:
            text = caption(obj, colour)
            assert text == f"a {colour} {obj}"
            assert parse_caption(text) == (obj, colour)
            for suffix in VIEW_SUFFIXES.values():
                assert parse_caption(text + suffix) == (obj, colour)
    assert parse_caption("  A  Red   CUBE, front view ") == ("cube", "red")
    for bad in ("", "a red", "a red dragon", "a golden cube", "the red cube", "a red cube please", "red cube"):
        assert parse_caption(bad) is None, bad
    with pytest.raises(KeyError):
        caption("dragon", "red")


def test_vocabulary_covers_every_caption_word():
    vocab = set(vocabulary())
    for text in all_captions():
        for suffix in VIEW_SUFFIXES.values():
            for word in (text + suffix).replace(",", " , ").split():
                assert word in vocab, word
    assert {"front", "side", "back", "overhead", "view", ","} <= vocab


def test_objects_are_centred_and_normalised():
    lin = torch.linspace(-0.72, 0.72, 57)
    pts = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), dim=-1).view(-1, 3)
    for name, obj in OBJECTS.items():
        inside = pts[obj.sdf(pts) <= 0]
        assert len(inside) > 100, name
        radius = float(inside.norm(dim=-1).max())
        assert 0.4 <= radius <= 0.66, (name, radius)
        centre = (inside.amax(0) + inside.amin(0)) / 2
        assert float(centre.abs().max()) < 0.06, (name, centre)
        assert float((inside.amax(0) - inside.amin(0)).max()) > 0.6, name  # one scale: no tiny object


# ------------------------------------------------------------------------------------------------ render
def test_every_object_renders_a_centred_silhouette_at_the_eval_camera():
    cams = orbit_cameras(CFG, 1)
    names = list(OBJECTS)
    out = render_objects(names, "blue", _repeat(cams, len(names)), 64)
    rgb, mask = out["rgb"], out["mask"]
    assert rgb.shape == (len(names), 3, 64, 64) and mask.shape == (len(names), 1, 64, 64)
    assert rgb.min() >= 0 and rgb.max() <= 1 and mask.min() >= 0 and mask.max() <= 1
    for i, name in enumerate(names):
        m = mask[i, 0]
        area = float(m.sum())
        assert 150 < area < 0.5 * 64 * 64, (name, area)
        rows, cols = (m > 0.5).any(dim=1).nonzero().squeeze(1), (m > 0.5).any(dim=0).nonzero().squeeze(1)
        cx, cy = (float(cols[0]) + float(cols[-1]) + 1) / 2, (float(rows[0]) + float(rows[-1]) + 1) / 2
        assert abs(cx - 32) < 4 and abs(cy - 32) < 4, (name, cx, cy)  # the bounding box is centred
        # the background is plain white and the silhouette does not touch the border
        assert float(m[0].max() + m[-1].max() + m[:, 0].max() + m[:, -1].max()) < 1e-3, name
        assert torch.allclose(rgb[i, :, 0, 0], torch.ones(3))


def _repeat(cams, n):
    return spherical_cameras(cams.elevation.repeat(n), cams.azimuth.repeat(n), cams.radius.repeat(n),
                             cams.fovy.repeat(n))


def test_front_back_objects_differ_between_front_and_back_primitives_do_not():
    cams = eval_cams([0, 180])
    for name in OBJECTS:
        img = render_objects(name, "blue", cams)["rgb"]
        front, back = img[0], img[1]
        diff = min(float((front - back).abs().mean()), float((front - back.flip(-1)).abs().mean()))
        if name in FRONT_BACK_OBJECTS:
            assert diff > 2e-3, name
        else:
            assert diff < 1e-4, name


def _count(img, cond):
    r, g, b = img
    return int(cond(r, g, b).sum())


def test_front_details_are_visible_only_from_the_front():
    cams = eval_cams([0, 180])
    orange = lambda r, g, b: (r > 0.5) & (g > 0.15) & (g < 0.6 * r) & (b < 0.15)  # noqa: E731
    snow = render_objects("snowman", "blue", cams)["rgb"]
    assert _count(snow[0], orange) >= 2 and _count(snow[1], orange) == 0
    brown = lambda r, g, b: (r > 0.15) & (r < 0.5) & (g < 0.6 * r) & (b < 0.5 * g + 0.02)  # noqa: E731
    house = render_objects("house", "blue", cams)["rgb"]
    assert _count(house[0], brown) >= 10 and _count(house[1], brown) == 0
    out = render_objects("mug", "blue", cams)
    white = lambda r, g, b: (r > 0.8) & (g > 0.8) & (b > 0.8)  # noqa: E731
    label = [_count(out["rgb"][i] * (out["mask"][i] > 0.99), white) for i in range(2)]
    assert label[0] >= 10 and label[1] == 0
    yellow = lambda r, g, b: (r > 0.6) & (g > 0.5) & (b < 0.45)  # noqa: E731
    car = render_objects("car", "blue", cams)["rgb"]
    assert _count(car[0], yellow) >= 2 and _count(car[1], yellow) == 0


def _runs(row):
    """(start, stop) of the runs of True in a 1-D bool tensor."""
    padded = torch.cat([torch.tensor([False]), row, torch.tensor([False])]).int()
    edges = (padded[1:] - padded[:-1]).nonzero().squeeze(1).tolist()
    return list(zip(edges[::2], edges[1::2]))


def test_mug_handle_is_on_the_plus_x_side():
    mask = render_objects("mug", "green", eval_cams([0, 180]))["mask"][:, 0] > 0.5
    for view, handle_right in ((0, True), (1, False)):
        runs = _runs(mask[view, 32])  # the middle row crosses the body and, past a gap, the handle
        assert len(runs) == 2, runs
        widths = [b - a for a, b in runs]
        handle = runs[int(widths[1] < widths[0])]
        assert (handle[0] > 32) == handle_right, runs  # az 0: +X is on the image's right; az 180: on its left


def _object_colour(out):
    m = (out["mask"] > 0.99).float()
    return (out["rgb"] * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3))  # [B, 3]


def test_colours_render_as_themselves():
    cams = eval_cams([0])
    red = _object_colour(render_objects("cube", "red", cams))[0]
    assert red[0] > 0.4 and red[0] > 3 * red[1] and red[0] > 3 * red[2]
    names = list(COLOURS)
    table = torch.nn.functional.normalize(torch.tensor([COLOURS[c] for c in names]), dim=-1)
    out = render_objects("sphere", names, _repeat(cams, len(names)))
    seen = torch.nn.functional.normalize(_object_colour(out), dim=-1)
    assert (seen @ table.T).argmax(dim=1).tolist() == list(range(len(names)))


def test_lambertian_shading_ambient_and_light():
    cams = eval_cams([0], elevation=0.0)
    flat = render_objects("cube", "blue", cams, ambient=1.0)
    m = flat["mask"][0, 0] > 0.999
    assert torch.allclose(flat["rgb"][0][:, m], torch.tensor(COLOURS["blue"])[:, None], atol=2e-3)
    left = render_objects("sphere", "grey", cams, light_dirs=torch.tensor([[-1.0, 0.0, 0.3]]), ambient=0.2)
    right = render_objects("sphere", "grey", cams, light_dirs=torch.tensor([[1.0, 0.0, 0.3]]), ambient=0.2)
    lum = lambda out: out["rgb"][0].mean(dim=0)  # noqa: E731
    assert float(lum(left)[24:40, 14:28].mean()) > float(lum(left)[24:40, 36:50].mean()) + 0.1
    assert float(lum(right)[24:40, 36:50].mean()) > float(lum(right)[24:40, 14:28].mean()) + 0.1
    # the darkest object pixel is the ambient fraction of the albedo
    dark = lum(left)[flat["mask"][0, 0] > 0.999].min()
    assert abs(float(dark) - 0.2 * 0.5) < 0.03


def test_render_rejects_unknown_names():
    with pytest.raises(KeyError):
        render_objects("dragon", "red", eval_cams([0]))
    with pytest.raises(KeyError):
        render_objects("cube", "gold", eval_cams([0]))
    with pytest.raises(ValueError):
        render_objects(["cube", "cube"], "red", eval_cams([0]))


# ------------------------------------------------------------------------------------------------ dataset
@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tw") / "a"
    render_dataset(folder, 20, seed=3, resolution=32, shard_size=8, progress=False)
    return folder


def test_same_seed_gives_identical_shards_other_seed_differs(small_dataset, tmp_path):
    again = render_dataset(tmp_path / "b", 20, seed=3, resolution=32, shard_size=8, progress=False)
    first = files_bytes(small_dataset)
    assert list(first) == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    assert first == files_bytes(again)
    other = render_dataset(tmp_path / "c", 20, seed=4, resolution=32, shard_size=8, progress=False)
    a, c = ToyworldDataset.load(small_dataset).arrays, ToyworldDataset.load(other).arrays
    assert not np.array_equal(a["images"], c["images"])
    assert not np.array_equal(a["azimuth"], c["azimuth"])


def test_shard_labels_match_captions_and_cameras(small_dataset):
    ds = ToyworldDataset.load(small_dataset)
    meta = read_meta(small_dataset)
    assert meta["view_labels"] == list(VIEW_LABELS) == ["front", "side", "back", "overhead"]
    assert meta["objects"] == list(OBJECTS) and meta["colours"] == list(COLOURS)
    assert meta["n"] == 20 and meta["seed"] == 3 and meta["resolution"] == 32
    a = ds.arrays
    assert a["images"].dtype == np.uint8 and a["images"].shape == (20, 32, 32, 3)
    plain = 0
    for i in range(len(ds)):
        text = str(a["captions"][i])
        assert parse_caption(text) == (ds.objects[a["object"][i]], ds.colours[a["colour"][i]])
        label = ds.view_labels[a["view"][i]]
        assert label == view_label(float(a["elevation"][i]), float(a["azimuth"][i]))
        if any(text.endswith(s) for s in VIEW_SUFFIXES.values()):
            assert text.endswith(VIEW_SUFFIXES[label])
        else:
            plain += 1
        assert CFG.radius[0] <= a["radius"][i] <= CFG.radius[1] and CFG.fovy[0] <= a["fovy"][i] <= CFG.fovy[1]
        assert CFG.elevation[0] <= a["elevation"][i] <= CFG.elevation[1]
    assert 0 < plain < 20


def test_stored_images_are_renders_of_their_labels(small_dataset):
    """Re-render example 0 from its stored camera (ambient 1: no light randomness) and compare silhouettes."""
    ds = ToyworldDataset.load(small_dataset)
    a = ds.arrays
    cams = spherical_cameras(a["elevation"][:4], a["azimuth"][:4], a["radius"][:4], a["fovy"][:4])
    names = [ds.objects[k] for k in a["object"][:4]]
    cols = [ds.colours[k] for k in a["colour"][:4]]
    mask = render_objects(names, cols, cams, 32)["mask"][:, 0] > 0.5
    stored = ds.images(range(4))
    stored_mask = (stored < 0.97).any(dim=1)
    agree = (mask == stored_mask).float().mean(dim=(1, 2))
    assert bool((agree > 0.97).all()), agree


def test_reader_round_trip(small_dataset):
    ds = ToyworldDataset.load(small_dataset)
    assert len(ds) == 20
    item = ds[5]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert torch.allclose(item["image"], torch.from_numpy(ds.arrays["images"][5]).permute(2, 0, 1).float() / 255)
    assert parse_caption(item["caption"]) == (ds.objects[item["object"]], ds.colours[item["colour"]])
    assert ds.images([1, 2]).shape == (2, 3, 32, 32)
    assert 0.0 <= float(ds.images().min()) and float(ds.images().max()) <= 1.0


def test_pairs_are_balanced_across_shards():
    n_pairs = len(OBJECTS) * len(COLOURS)
    idx = torch.cat([generate.pair_indices(0, s, min(s + 50, 2 * n_pairs)) for s in range(0, 2 * n_pairs, 50)])
    assert sorted(idx[:n_pairs].tolist()) == list(range(n_pairs))
    assert sorted(idx[n_pairs:].tolist()) == list(range(n_pairs))
    assert not torch.equal(idx[:n_pairs], idx[n_pairs:])
    assert torch.equal(generate.pair_indices(0, 30, 150), idx[30:150])


def test_resume_skips_complete_shards(small_dataset, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "resume"
    shutil.copytree(small_dataset, folder)
    original = files_bytes(small_dataset)
    (folder / "meta.json").unlink()  # as if killed before the end
    (folder / "shard_00001.npz").unlink()
    (folder / "shard_00002.npz").write_bytes(b"half a shard")  # corrupt: re-rendered
    rendered = []
    real = generate.render_shard

    def spy(seed, index, *args, **kwargs):
        rendered.append(index)
        return real(seed, index, *args, **kwargs)

    monkeypatch.setattr(generate, "render_shard", spy)
    render_dataset(folder, 20, seed=3, resolution=32, shard_size=8, progress=False)
    assert rendered == [1, 2]
    assert files_bytes(folder) == original
    rendered.clear()
    render_dataset(folder, 20, seed=3, resolution=32, shard_size=8, progress=False)  # complete: nothing to do
    assert rendered == []
    render_dataset(folder, 28, seed=3, resolution=32, shard_size=8, progress=False)  # grow: only the tail
    assert rendered == [2, 3] and len(ToyworldDataset.load(folder)) == 28
    with pytest.raises(UserError, match="other settings"):
        render_dataset(folder, 20, seed=4, resolution=32, shard_size=8, progress=False)


def test_render_dataset_rejects_bad_arguments(tmp_path):
    for kwargs in ({"n": 0}, {"n": 5, "seed": -1}, {"n": 5, "shard_size": 0}, {"n": 5, "p_plain_caption": 1.5},
                   {"n": 5, "resolution": 2}):
        with pytest.raises(UserError):
            render_dataset(tmp_path / "x", progress=False, **kwargs)


def test_max_elevation_shows_the_objects_from_above(tmp_path):
    """--max-elevation raises the cameras' top elevation: some views from above, captioned "overhead view"; the
    setting is part of the render's identity (a resume with another is refused) and checked."""
    folder = render_dataset(tmp_path / "high", 40, seed=3, resolution=16, shard_size=20, progress=False,
                            max_elevation=85.0)
    data = ToyworldDataset.load(folder)
    elevation = np.asarray(data.arrays["elevation"])
    assert elevation.max() > 60.0 and elevation.min() >= -10.0 and elevation.max() <= 85.0
    captions = [str(c) for c in data.arrays["captions"]]
    overhead = [c for c, e in zip(captions, elevation) if e >= 60.0 and c.endswith(", overhead view")]
    assert overhead and all(e >= 60.0 for c, e in zip(captions, elevation) if c.endswith(", overhead view"))
    low = ToyworldDataset.load(render_dataset(tmp_path / "low", 40, seed=3, resolution=16, shard_size=20,
                                              progress=False))
    assert np.asarray(low.arrays["elevation"]).max() <= 45.0
    with pytest.raises(UserError, match="other settings"):
        render_dataset(folder, 40, seed=3, resolution=16, shard_size=20, progress=False)
    with pytest.raises(UserError, match="top elevation"):
        render_dataset(tmp_path / "bad", 4, progress=False, max_elevation=90.0)


def test_min_radius_brings_the_cameras_nearer(tmp_path):
    """--min-radius lowers the bottom of the cameras' distance range (2.6 by default), so the objects are seen
    larger; the setting is part of the render's identity, recorded in meta.json and checked."""
    folder = render_dataset(tmp_path / "near", 40, seed=3, resolution=16, shard_size=20, progress=False,
                            min_radius=1.8)
    data = ToyworldDataset.load(folder)
    radius = np.asarray(data.arrays["radius"])
    assert radius.min() >= 1.8 - 1e-5 and radius.max() <= 3.0 + 1e-5 and (radius < 2.6).mean() > 0.3
    assert json.loads((folder / "meta.json").read_text())["radius"] == [1.8, 3.0]
    usual = ToyworldDataset.load(render_dataset(tmp_path / "usual", 40, seed=3, resolution=16, shard_size=20,
                                                progress=False))
    assert np.asarray(usual.arrays["radius"]).min() >= 2.6 - 1e-5
    with pytest.raises(UserError, match="other settings"):
        render_dataset(folder, 40, seed=3, resolution=16, shard_size=20, progress=False)
    with pytest.raises(UserError, match="nearest camera distance"):
        render_dataset(tmp_path / "bad", 4, progress=False, min_radius=1.0)


# ------------------------------------------------------------------------------------------------ cli
def test_cli_list_and_render(tmp_path):
    runner = CliRunner()
    res = runner.invoke(toyworld_app, ["list"])
    assert res.exit_code == 0, res.output
    for name in OBJECTS:
        assert name in res.output
    for name in FRONT_BACK_OBJECTS:
        assert f"* {name}" in res.output
    for name in COLOURS:
        assert name in res.output
    assert f"captions: {len(all_captions())}" in res.output
    res = runner.invoke(toyworld_app, ["list", "--captions"])
    assert res.exit_code == 0 and res.output.splitlines() == all_captions()
    res = runner.invoke(toyworld_app, ["render", "--n", "6", "--out", str(tmp_path / "d"), "--resolution", "16",
                                       "--shard-size", "4", "--workers", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    assert len(ToyworldDataset.load(tmp_path / "d")) == 6
    res = runner.invoke(toyworld_app, ["render", "--n", "0", "--out", str(tmp_path / "e"), "--quiet"])
    assert isinstance(res.exception, UserError)


def test_shipped_eval_prompts_ask_only_for_views_the_training_cameras_show():
    from pathlib import Path

    shipped = (Path(__file__).resolve().parent.parent / "text3d" / "assets" / "eval" / "prompts_216.txt").read_text().splitlines()
    assert shipped == eval_prompts()
    assert len(shipped) == 2 * len(OBJECTS) * len(COLOURS)
    assert [parse_caption(p) for p in shipped[::2]] == [parse_caption(p) for p in shipped[1::2]]
    labels = [view_suffix_label(p) for p in shipped[1::2]]
    assert all(view_suffix_label(p) is None for p in shipped[::2])
    assert set(labels) == {"front", "side", "back"}  # no "overhead": the training cameras stay below 60 degrees
    for obj in FRONT_BACK_OBJECTS:  # each front/back object is asked for every view
        assert {lab for p, lab in zip(shipped[1::2], labels) if parse_caption(p)[0] == obj} == set(labels)
    assert view_suffix_label(eval_prompts(["overhead"])[1]) == "overhead"


def test_shipped_view_prompts_ask_every_front_back_object_for_every_reachable_view():
    from pathlib import Path

    from text3d.cameras import reachable_view_labels

    shipped = (Path(__file__).resolve().parent.parent / "text3d" / "assets" / "eval" / "prompts_views_108.txt").read_text()
    shipped = shipped.splitlines()
    assert shipped == view_eval_prompts()
    asked = [(*parse_caption(p), view_suffix_label(p)) for p in shipped]
    assert len(set(asked)) == len(asked) == len(FRONT_BACK_OBJECTS) * len(COLOURS) * len(reachable_view_labels())
    assert {o for o, _, _ in asked} == set(FRONT_BACK_OBJECTS) and {v for _, _, v in asked} == {"front", "side", "back"}


def test_shipped_3d_table_prompts_cover_every_object_twice_and_every_colour():
    from collections import Counter
    from pathlib import Path

    from text3d.toyworld.catalog import table_prompts

    shipped = (Path(__file__).resolve().parent.parent / "text3d" / "assets" / "eval" / "prompts_3d_24.txt").read_text()
    assert shipped.splitlines() == table_prompts()
    pairs = [parse_caption(p) for p in shipped.splitlines()]
    assert len(pairs) == len(set(pairs)) == 24
    objects, colours = Counter(o for o, _ in pairs), Counter(c for _, c in pairs)
    assert set(objects) == set(OBJECTS) and set(objects.values()) == {2}  # every object twice, two colours
    assert set(colours) == set(COLOURS) and min(colours.values()) >= 2 and colours["grey"] >= 2
    assert all(objects[o] == 2 for o in FRONT_BACK_OBJECTS)


def test_cli_help_names_the_camera_samplers_distances():
    """The CLIs' help texts (kept free of torch's import, so written out) give the distances the code uses."""
    import inspect

    from text3d.cameras import CameraSamplerConfig
    from text3d.teacher_training.cli import train_cmd
    from text3d.toyworld.cli import render_cmd

    near, far = CameraSamplerConfig().radius
    render_help = inspect.signature(render_cmd).parameters["min_radius"].default.help
    train_help = inspect.signature(train_cmd).parameters["camera_drop_max_elevation"].default.help
    assert f"default {near:g}" in render_help and f"farthest is {far:g}" in render_help
    assert f"the usual {near:g}," in train_help
