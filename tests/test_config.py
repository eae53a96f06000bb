"""The config system: YAML defaults, key=value overrides, and one-line errors for bad keys and values."""

import pytest

from text3d.generate.config import RunConfig, load_config, to_yaml
from text3d.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(overrides=["train.steps=7", "sds.guidance_scale=12.5", "camera.radius=[2.0,2.5]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.steps == 7 and cfg.sds.guidance_scale == 12.5 and list(cfg.camera.radius) == [2.0, 2.5]
    extra = tmp_path / "x.yaml"
    extra.write_text("train:\n  lr: 0.002\n")
    cfg = load_config(files=[extra], overrides=["train.lr=0.003"])
    assert cfg.train.lr == 0.003  # CLI overrides beat files
    assert load_config(files=[extra]).train.lr == 0.002


def test_snapshot_round_trip(tmp_path):
    cfg = load_config(overrides=["seed=5", "train.steps=3"])
    cfg.prompt = "a red cube, front: 'quoted'"
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(files=[path], use_default_file=False)
    assert again == cfg


@pytest.mark.parametrize("override, words", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("nope=1", "unknown config key 'nope'"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=0", "train.steps must be at least 1"),
    ("train.resolution=30", "multiple of 8"),
    ("sds.t_min=0.99", "sds.t_min"),
    ("guidance=magic", "guidance must be one of"),
    ("noequals", "key=value"),
    ("nerf.normals=bogus", "normals must be"),
    ("export.texture_size=4", "export.texture_size"),
    ("camera.radius=[3.0,2.0]", "camera.radius"),
])
def test_bad_values_raise_one_line_config_errors(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    message = str(info.value)
    assert words in message and "\n" not in message


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(files=[tmp_path / "missing.yaml"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(files=[bad])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  colour: red\n")
    with pytest.raises(ConfigError, match="train.colour"):
        load_config(files=[unknown])


def test_view_warmup_opens_the_azimuth_range_from_the_front(tiny_teacher_dir, tmp_path, monkeypatch):
    """train.view_warmup: the training cameras' azimuth range is the front +-view_warmup_azimuth at the first step,
    widens linearly and is camera.azimuth from view_warmup of the run on; the trainer draws from it."""
    import torch

    from text3d.errors import ConfigError
    from text3d.generate.config import training_cameras

    cfg = load_config(overrides=["train.view_warmup=0.5", "train.view_warmup_azimuth=20", "train.steps=100"])
    ranges = [training_cameras(cfg.camera, cfg.train, s).azimuth for s in (1, 26, 51, 100)]
    assert ranges == [(-20.0, 20.0), (-100.0, 100.0), (-180.0, 180.0), (-180.0, 180.0)]
    assert training_cameras(cfg.camera, load_config().train, 1) == cfg.camera  # off (the default): unchanged
    assert cfg.camera.azimuth == (-180.0, 180.0)  # the config itself is left alone
    with pytest.raises(ConfigError, match="train.view_warmup must be in"):
        load_config(overrides=["train.view_warmup=2"])

    from tests.helpers import FAST
    from text3d.generate.trainer import AssetTrainer
    from text3d.teacher import load_teacher

    run = load_config(overrides=FAST + [f"teacher.name_or_path={tiny_teacher_dir}", "train.steps=10",
                                        "train.view_warmup=1.0", "train.view_warmup_azimuth=10"])
    run.prompt = "a red car"
    trainer = AssetTrainer(run, load_teacher(str(tiny_teacher_dir), "cpu"), torch.device("cpu"), tmp_path / "run",
                           show_progress=False)
    drawn = []
    import text3d.generate.trainer as trainer_module

    original = trainer_module.sample_cameras
    monkeypatch.setattr(trainer_module, "sample_cameras",
                        lambda camera, n: drawn.append(camera.azimuth) or original(camera, n))
    for step in (1, 2):
        trainer.train_step(step)
    assert drawn == [(-10.0, 10.0), (-27.0, 27.0)]


def test_lr_end_decays_every_groups_rate_geometrically_in_the_runs_last_part(tiny_teacher_dir, tmp_path):
    """train.lr_end: every parameter group at its own rate until lr_decay_start of the run, then falling
    geometrically to lr_end / lr of it at the last step; the trainer sets the rates each step."""
    import torch

    from text3d.errors import ConfigError
    from text3d.generate.config import lr_factor

    t = load_config(overrides=["train.lr=0.01", "train.lr_end=0.001", "train.lr_decay_start=0.5",
                               "train.steps=100"]).train
    factors = [lr_factor(t, s) for s in (1, 51, 76, 100)]
    assert factors[:2] == [1.0, 1.0]  # run_progress 0.5 at step 51
    assert factors[2] == pytest.approx(0.1 ** 0.5) and factors[3] == pytest.approx(0.1 ** 0.98)
    assert lr_factor(load_config(overrides=["train.steps=100"]).train, 100) == 1.0  # off (the default): constant
    with pytest.raises(ConfigError, match="train.lr_end must be > 0"):
        load_config(overrides=["train.lr_end=0"])

    from tests.helpers import FAST
    from text3d.generate.trainer import AssetTrainer
    from text3d.teacher import load_teacher

    run = load_config(overrides=FAST + [f"teacher.name_or_path={tiny_teacher_dir}", "train.steps=4", "train.lr=0.01",
                                        "train.lr_end=0.0001", "train.lr_decay_start=0.0", "nerf.background=learned",
                                        "train.lr_background=0.002"])
    run.prompt = "a red car"
    trainer = AssetTrainer(run, load_teacher(str(tiny_teacher_dir), "cpu"), torch.device("cpu"), tmp_path / "run",
                           show_progress=False)
    rates = []
    for step in (1, 2, 3):
        trainer.train_step(step)
        rates.append([group["lr"] for group in trainer.optimizer.param_groups])
    assert len(rates[0]) == 2  # the field's group and the background's
    for step, row in zip((1, 2, 3), rates):
        f = 0.01 ** ((step - 1) / 4)
        assert row == pytest.approx([0.01 * f, 0.002 * f])


def test_coarse_to_fine_preset_renders_small_then_full():
    """The shipped coarse-to-fine preset: 32 px for the first half of the run, the default's 64 px from the half on,
    one view a step for 1200 steps (as it was measured; the default takes two a step for 600), every other setting
    the default's."""
    from text3d.generate.config import render_resolution
    from text3d.runtime.resources import CONFIG_DIR

    cfg = load_config(files=[CONFIG_DIR / "coarse-to-fine.yaml"])
    default = load_config()
    t = cfg.train
    assert [render_resolution(t, s) for s in (1, t.steps // 2, t.steps // 2 + 1, t.steps)] == [32, 32, 64, 64]
    assert render_resolution(default.train, 1) == default.train.resolution == 64
    assert (cfg.sds, cfg.camera, cfg.export) == (default.sds, default.camera, default.export)
    assert (t.steps, t.batch_size) == (1200, 1) and t.steps * t.batch_size == default.train.steps * default.train.batch_size
