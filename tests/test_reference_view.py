"""The teacher's front view pinned in a mesh stage (text3d.generate.reference): the reference's foreground, the pull
of the loss on the surface's colours, the image kept in the checkpoint, and the config's checks."""

import pytest
import torch

from tests.helpers import FAST
from text3d.errors import CheckpointError, ConfigError
from text3d.generate.config import load_config
from text3d.generate.reference import ReferenceView, reference_foreground

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reference_foreground_keeps_white_inside_the_object_and_drops_the_border_background():
    image = torch.ones(1, 3, 16, 16)
    image[:, :, 4:12, 4:12] = torch.tensor([0.1, 0.6, 0.1]).view(1, 3, 1, 1)  # a green square
    image[:, :, 6:8, 6:8] = 0.97  # a white light inside it
    image[:, :, 0:3, 13:16] = 0.95  # near-white background touching the border
    fg = reference_foreground(image, erode=0)[0, 0]
    expected = torch.zeros(16, 16)
    expected[4:12, 4:12] = 1.0
    assert torch.equal(fg, expected)
    eroded = torch.zeros(16, 16)  # the edge band (the antialiased rim of a real sample) dropped too
    eroded[6:10, 6:10] = 1.0
    assert torch.equal(reference_foreground(image, erode=2)[0, 0], eroded)


def _texture_trainer(tiny_teacher_dir, run_dir, weight: float, extra: tuple[str, ...] = ()):
    from text3d.generate.trainer import AssetTrainer
    from text3d.renderers.nerf import NeRFRenderer
    from text3d.teacher import load_teacher

    cfg = load_config(overrides=FAST + [f"teacher.name_or_path={tiny_teacher_dir}", "texture.steps=12",
                                        "texture.resolution=32", "texture.lr=0.02", "export.grid_resolution=32",
                                        f"texture.reference_weight={weight}", "texture.reference_steps=4",
                                        "texture.reference_jitter=2", "sds.guidance_scale=5", "stages=[nerf,texture]",
                                        *extra])
    cfg.prompt = "a green car"
    torch.manual_seed(0)
    source = NeRFRenderer(cfg.nerf)
    return AssetTrainer(cfg, load_teacher(str(tiny_teacher_dir), "cpu"), torch.device("cpu"), run_dir,
                        show_progress=False, stage="texture", sources=[source])


def _front_error(trainer, reference: ReferenceView) -> float:
    """The masked squared error of the unjittered front render against the reference, at 32 px."""
    jitter, weight = reference.jitter, reference.weight
    reference.jitter, reference.weight = 0.0, 2.0
    with torch.no_grad():
        error = float(reference.loss(trainer.renderer, 32, trainer.train_cfg.ambient))
    reference.jitter, reference.weight = jitter, weight
    return error


def test_the_reference_pulls_the_surfaces_front_towards_the_teachers_sample(tiny_teacher_dir, tmp_path):
    pinned = _texture_trainer(tiny_teacher_dir, tmp_path / "pinned", weight=20.0)
    plain = _texture_trainer(tiny_teacher_dir, tmp_path / "plain", weight=0.0)
    assert plain.reference is None and pinned.reference is not None
    assert (tmp_path / "pinned" / "texture_reference.png").is_file()
    reference = pinned.reference
    assert reference.image.shape == (1, 3, 64, 64)
    before = _front_error(pinned, reference)
    assert before == pytest.approx(_front_error(plain, reference), rel=1e-5)  # the same surface and field to start
    torch.manual_seed(1)
    stats = [pinned.train_step(step) for step in range(1, 13)]
    torch.manual_seed(1)
    for step in range(1, 13):
        plain.train_step(step)
    assert all("reference" in s and s["reference"] > 0 for s in stats)
    assert _front_error(pinned, reference) < 0.7 * before
    assert _front_error(pinned, reference) < 0.8 * _front_error(plain, reference)


def test_the_reference_image_is_kept_in_the_checkpoint(tiny_teacher_dir, tmp_path, monkeypatch):
    grey = torch.full((1, 3, 64, 64), 0.25)  # not what the teacher draws
    with monkeypatch.context() as patch:
        patch.setattr(ReferenceView, "sample", classmethod(
            lambda cls, teacher, cfg, stage_cfg, device: cls.from_state({"image": grey}, cfg, stage_cfg, device)))
        trainer = _texture_trainer(tiny_teacher_dir, tmp_path / "run", weight=1.0)
        trainer.train_step(1)
    trainer.step = 1
    path = trainer.save()
    again = _texture_trainer(tiny_teacher_dir, tmp_path / "run", weight=1.0)
    assert not torch.equal(again.reference.image, trainer.reference.image)
    again.load(path)
    assert torch.equal(again.reference.image, trainer.reference.image)
    assert float(again.reference.foreground.min()) == 1.0  # a grey image has no background


@pytest.mark.parametrize("override, message", [("texture.reference_weight=-1", "reference_weight"),
                                               ("texture.reference_steps=0", "reference_steps"),
                                               ("geometry.reference_elevation=90", "reference_elevation")])
def test_reference_settings_out_of_range_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_a_resumed_stage_takes_the_reference_from_its_checkpoint_without_sampling_it(tiny_teacher_dir, tmp_path,
                                                                                    monkeypatch):
    trainer = _texture_trainer(tiny_teacher_dir, tmp_path / "run", weight=1.0)
    trainer.train_step(1)  # the reference is drawn on first use
    trainer.step = 1
    path = trainer.save()
    drawn = trainer.reference.image.clone()

    def no_sampling(*args, **kwargs):
        raise AssertionError("the reference was sampled again on resume")

    monkeypatch.setattr(ReferenceView, "sample", no_sampling)
    again = _texture_trainer(tiny_teacher_dir, tmp_path / "run", weight=1.0)
    again.load(path)
    assert torch.equal(again.reference.image, drawn)
    assert again.reference.weight == 1.0 and again.reference.jitter == 2.0
    again.train_step(2)


def test_a_checkpoint_reference_of_another_view_count_is_a_one_line_error(tiny_teacher_dir, tmp_path):
    trainer = _texture_trainer(tiny_teacher_dir, tmp_path / "run", weight=1.0)
    trainer.train_step(1)
    trainer.step = 1
    path = trainer.save()
    again = _texture_trainer(tiny_teacher_dir, tmp_path / "run", weight=1.0,
                             extra=("texture.reference_back=true",))  # two views pinned now, one in the checkpoint
    with pytest.raises(CheckpointError, match=r"holds 1 view\(s\) but the config pins 2 \(front, back\)"):
        again.load(path)


def test_reference_negative_back_makes_the_back_view_cfgs_unconditional_branch(tiny_teacher_dir, monkeypatch):
    from text3d.generate.reference import reference_negative
    from text3d.teacher import load_teacher
    import text3d.teacher.sampling as sampling

    cfg = load_config(overrides=["texture.reference_weight=1", "texture.reference_steps=2",
                                 "texture.reference_negative_back=false"])
    cfg.prompt = "a red car"
    assert reference_negative(cfg, cfg.texture) == ""
    cfg.texture.reference_negative_back = True  # the default's
    assert reference_negative(cfg, cfg.texture) == "a red car, back view"
    cfg.prompts.negative = "blurry"
    assert reference_negative(cfg, cfg.texture) == "a red car, back view, blurry"
    seen = []
    real = sampling.sample_images

    def spy(teacher, prompts, **kwargs):
        seen.append((list(prompts), kwargs["negative"]))
        return real(teacher, prompts, **kwargs)

    monkeypatch.setattr(sampling, "sample_images", spy)
    teacher = load_teacher(str(tiny_teacher_dir), "cpu")
    pushed = ReferenceView.sample(teacher, cfg, cfg.texture, torch.device("cpu")).image
    cfg.texture.reference_negative_back = False
    plain = ReferenceView.sample(teacher, cfg, cfg.texture, torch.device("cpu")).image
    assert seen == [(["a red car, front view"], "a red car, back view, blurry"), (["a red car, front view"], "blurry")]
    assert not torch.equal(pushed, plain)  # the same seed, another unconditional branch


def test_reference_back_pins_the_back_view_pushed_away_from_the_front(tiny_teacher_dir, monkeypatch):
    from text3d.teacher import load_teacher
    import text3d.teacher.sampling as sampling

    cfg = load_config(overrides=["texture.reference_weight=1", "texture.reference_steps=2", "texture.reference_back=true",
                                 "texture.reference_jitter=3"])
    cfg.prompt = "a red house"
    seen = []
    real = sampling.sample_images

    def spy(teacher, prompts, **kwargs):
        seen.append((list(prompts), kwargs["negative"], kwargs["generator"].initial_seed()))
        return real(teacher, prompts, **kwargs)

    monkeypatch.setattr(sampling, "sample_images", spy)
    reference = ReferenceView.sample(load_teacher(str(tiny_teacher_dir), "cpu"), cfg, cfg.texture, torch.device("cpu"))
    assert seen == [(["a red house, front view"], "a red house, back view", cfg.seed),
                    (["a red house, back view"], "a red house, front view", cfg.seed + 1)]
    assert reference.image.shape[0] == 2 and reference.azimuths == (0.0, 180.0)

    seen_cams = []

    def renderer(cams, h, w, **kwargs):  # a flat grey surface seen whole by every camera
        seen_cams.append(cams)
        rgb = grey.expand(len(cams), 3, h, w)
        return {"rgb": rgb, "opacity": torch.ones(len(cams), h, w, 1)}

    grey = torch.full((1, 3, 1, 1), 0.5, requires_grad=True)
    loss = reference.loss(renderer, 16, ambient=0.3)
    loss.backward()
    azimuths = seen_cams[0].azimuth
    assert len(azimuths) == 2 and abs(float(azimuths[0])) <= 3.0 and 177.0 <= abs(float(azimuths[1])) <= 180.0
    small = torch.nn.functional.interpolate(reference.image, size=(16, 16), mode="bilinear", antialias=True)
    fg = torch.nn.functional.interpolate(reference.foreground, size=(16, 16), mode="nearest")
    expected = 0.5 * ((0.5 - small).pow(2) * fg).sum()  # both views' errors, not the front's alone
    assert grey.grad is not None and float(grey.grad.abs().sum()) > 0
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(0.5 * ((0.5 - small[:1]).pow(2) * fg[:1]).sum()) < 0.99 * float(loss.detach())
