"""The view-aware teacher: a camera input added to a UNet (zero at first), the teacher passing the viewed
cameras to every UNet branch, guidance handing each render's camera over, and the fine-tune that teaches it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from text3d.cameras import CAMERA_FEATURES, CameraSamplerConfig, camera_features, sample_cameras, spherical_cameras

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def camera_teacher(tiny_teacher_dir):
    """The tiny test teacher with a camera input whose output layer is made non-zero (as after training)."""
    from text3d.teacher import load_teacher
    from text3d.teacher.teacher import Teacher
    from text3d.teacher_training.camera_input import with_camera_input

    base = load_teacher(tiny_teacher_dir, "cpu")
    unet = with_camera_input(base.unet)
    torch.manual_seed(0)
    with torch.no_grad():
        unet.class_embedding.linear_2.weight.normal_(0, 0.5)
    return base, Teacher(unet, base.vae, base.text_encoder, base.tokenizer, base.scheduler, "cpu", torch.float32)


def _inputs(teacher, batch=2):
    torch.manual_seed(1)
    z = torch.randn(batch, teacher.latent_channels, teacher.latent_size, teacher.latent_size)
    t = torch.tensor([500] * batch)
    cond = teacher.encode_prompts(["a red cube"] * batch)
    uncond = teacher.encode_prompts([""] * batch)
    return z, t, cond, uncond


def test_a_new_camera_input_changes_nothing_until_trained(tiny_teacher_dir, tmp_path):
    from text3d.teacher import load_teacher
    from text3d.teacher.teacher import Teacher
    from text3d.teacher_training.camera_input import with_camera_input

    base = load_teacher(tiny_teacher_dir, "cpu")
    assert base.camera_dim == 0
    unet = with_camera_input(base.unet)
    assert with_camera_input(unet) is unet  # already view-aware: kept
    teacher = Teacher(unet, base.vae, base.text_encoder, base.tokenizer, base.scheduler, "cpu", torch.float32)
    assert teacher.camera_dim == CAMERA_FEATURES
    z, t, cond, uncond = _inputs(teacher)
    cams = sample_cameras(CameraSamplerConfig(), 2)
    with torch.no_grad(), teacher.viewing(cams):
        seen = teacher.predict_eps(z, t, cond, uncond, guidance_scale=7.5)
    with torch.no_grad():
        assert torch.allclose(seen, base.predict_eps(z, t, cond, uncond, guidance_scale=7.5), atol=1e-5)
    # saved as a plain SD folder and recognised from its config when loaded back
    teacher.save_pretrained(tmp_path / "camera-teacher")
    config = json.loads((tmp_path / "camera-teacher" / "unet" / "config.json").read_text())
    assert config["class_embed_type"] == "projection" and config["projection_class_embeddings_input_dim"] == 16
    assert load_teacher(tmp_path / "camera-teacher", "cpu").camera_dim == CAMERA_FEATURES


def test_viewing_reaches_every_branch_of_a_batch(camera_teacher):
    base, teacher = camera_teacher
    z, t, cond, uncond = _inputs(teacher)
    front, back = spherical_cameras(20.0, [0.0, 10.0], 2.8, 42.0), spherical_cameras(20.0, [180.0, 170.0], 2.8, 42.0)
    with torch.no_grad():
        blind = teacher.predict_eps(z, t, cond)
        with teacher.viewing(front):
            a = teacher.predict_eps(z, t, cond, uncond, guidance_scale=7.5)
            branches = teacher.predict_eps_many(z, t, [uncond, cond, cond])
        with teacher.viewing(back):
            b = teacher.predict_eps(z, t, cond, uncond, guidance_scale=7.5)
        with teacher.viewing(None):
            assert torch.equal(teacher.predict_eps(z, t, cond), blind)  # no camera: the zero input
        # by hand: each branch of the stacked batch with the same two cameras
        labels = camera_features(front)
        by_hand = [teacher.unet(z, t, encoder_hidden_states=e, class_labels=labels).sample for e in (uncond, cond)]
    assert not torch.allclose(a, b, atol=1e-4)  # the camera matters once its embedding is trained
    assert torch.allclose(branches[0], by_hand[0], atol=1e-5) and torch.allclose(branches[1], by_hand[1], atol=1e-5)
    assert torch.allclose(branches[1], branches[2])
    assert torch.allclose(a, by_hand[0] + 7.5 * (by_hand[1] - by_hand[0]), atol=1e-4)
    assert teacher._view_features is None  # the block restored "no camera"


@pytest.mark.parametrize("space", ["latent", "image"])
def test_sds_hands_each_views_camera_to_the_teacher(camera_teacher, space):
    from text3d.guidance.sds import SDSConfig, SDSGuidance

    base, teacher = camera_teacher
    cfg = SDSConfig(guidance_scale=7.5, space=space)
    images = torch.rand(2, 3, 64, 64)
    front, back = spherical_cameras(20.0, [0.0, 10.0], 2.8, 42.0), spherical_cameras(20.0, [180.0, 170.0], 2.8, 42.0)
    t, noise = torch.tensor([400, 600]), torch.randn(2, teacher.latent_channels, teacher.latent_size, teacher.latent_size)

    def grad(guidance, cams):
        return guidance(images, ["a red cube"] * 2, cameras=cams, t=t, noise=noise).grad

    g_front, g_back = grad(SDSGuidance(teacher, cfg), front), grad(SDSGuidance(teacher, cfg), back)
    assert not torch.allclose(g_front, g_back, atol=1e-6)
    # a teacher without a camera input gives the same gradient whatever the camera
    assert torch.equal(grad(SDSGuidance(base, cfg), front), grad(SDSGuidance(base, cfg), back))


@pytest.mark.parametrize("teacher_camera", [True, False])
def test_a_loras_teacher_camera_switch_decides_whether_the_adapted_unet_sees_the_view(camera_teacher, teacher_camera):
    """A fresh LoRA predicts what the teacher does: with ``teacher_camera`` the teacher's prediction for the viewed
    camera, without it the "no camera" one; the LoRA's training loss sees the same input, and the block restores
    the viewed cameras for the teacher's own calls after it."""
    from text3d.guidance.lora import LoRAScoreNetwork

    base, teacher = camera_teacher
    z, t, cond, _ = _inputs(teacher)
    cams = spherical_cameras(20.0, [0.0, 180.0], 2.8, 42.0)
    lora = LoRAScoreNetwork(teacher, rank=4, teacher_camera=teacher_camera)
    try:
        with torch.no_grad():
            blind = teacher.predict_eps(z, t, cond)
            with teacher.viewing(cams):
                viewed = teacher.predict_eps(z, t, cond)
                got = lora.predict_eps(z, t, cond)
                loss = lora.denoising_loss(z, cond, t, torch.zeros_like(z))
                assert torch.equal(teacher.predict_eps(z, t, cond), viewed)  # the teacher's own calls: the view
            assert not torch.allclose(viewed, blind, atol=1e-4)
            expected = viewed if teacher_camera else blind
            assert torch.allclose(got, expected, atol=1e-5)
            noisy = teacher.add_noise(z, torch.zeros_like(z), t)
            with teacher.viewing(cams if teacher_camera else None):  # the target is the zero noise drawn
                by_hand = teacher.unet_output(noisy, t, cond).pow(2).flatten(1).mean(dim=1).mean()
            assert torch.allclose(loss, by_hand, atol=1e-5)
    finally:
        lora.remove()


def test_finetune_teaches_the_camera(tmp_path):
    from test_teacher_training import TINY, quiet, tiny_config
    from text3d.teacher import load_teacher
    from text3d.teacher_training.data import load_dataset, write_fake_dataset
    from text3d.teacher_training.finetune import finetune_teacher
    from text3d.teacher_training.run import train_teacher

    data_dir = write_fake_dataset(tmp_path / "data", n=24, seed=3)
    data = load_dataset(data_dir)
    init_cfg = tiny_config(tmp_path / "init", arch=TINY)
    train_teacher(init_cfg, data, data_path=data_dir, log=quiet)
    cfg = tiny_config(tmp_path / "ft", unet_steps=4, lr=1e-2)
    info = finetune_teacher(cfg, data, Path(init_cfg.out), view_repeat=2, replay=4, log=quiet, camera_drop=0.2)
    assert info["camera_drop"] == 0.2
    teacher = load_teacher(cfg.out, "cpu")
    assert teacher.camera_dim == CAMERA_FEATURES
    assert float(teacher.unet.class_embedding.linear_2.weight.abs().sum()) > 0  # it learned from zero
    card = (Path(cfg.out) / "README.md").read_text()
    assert "View-aware" in card and "20% of the examples" in card
    # --camera-lr-scale: the camera MLP in its own optimiser group, at that multiple of the UNet's rate (Adam's
    # steps scale with the rate: the same run at 10x moves the camera weights several times further from zero)
    fast = tiny_config(tmp_path / "ft10", unet_steps=4, lr=1e-2, camera_lr_scale=10.0)
    finetune_teacher(fast, data, Path(init_cfg.out), view_repeat=2, replay=4, log=quiet, camera_drop=0.2)
    moved = {name: float(load_teacher(c.out, "cpu").unet.class_embedding.linear_2.weight.abs().mean())
             for name, c in (("1x", cfg), ("10x", fast))}
    assert moved["10x"] > 3 * moved["1x"], moved
    assert "10x the UNet's rate" in (Path(fast.out) / "README.md").read_text()
    # a resume must use the same camera setting
    from text3d.errors import UserError
    from text3d.runtime.signals import StopRequest
    from text3d.teacher_training import Interrupted
    from test_teacher_training import _stop_at

    stop = StopRequest()
    with pytest.raises(Interrupted):
        finetune_teacher(tiny_config(tmp_path / "b", unet_steps=4, lr=1e-2), data, Path(init_cfg.out), view_repeat=2,
                         replay=4, log=quiet, camera_drop=0.2, stop=stop, on_step=_stop_at(stop, "unet", 2))
    with pytest.raises(UserError, match="camera|view repeat"):
        finetune_teacher(tiny_config(tmp_path / "b", unet_steps=4, lr=1e-2, resume=True), data, Path(init_cfg.out),
                         view_repeat=2, replay=4, log=quiet, camera_drop=None)
    finetune_teacher(tiny_config(tmp_path / "b", unet_steps=4, lr=1e-2, resume=True), data, Path(init_cfg.out),
                     view_repeat=2, replay=4, log=quiet, camera_drop=0.2)
    part = "unet/diffusion_pytorch_model.safetensors"
    assert (Path(cfg.out) / part).read_bytes() == (tmp_path / "b" / "teacher" / part).read_bytes()


def test_camera_drop_needs_init(tmp_path):
    from tests.helpers import run_cli

    r = run_cli("teacher", "train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--camera-drop", "0.1")
    assert r.returncode != 0 and "--camera-drop needs --init" in r.stderr and "Traceback" not in r.stderr


def test_sample_view_camera(camera_teacher, tmp_path):
    from text3d.cameras import view_features
    from text3d.distill2d.sample_cli import run_sample, view_cameras
    from text3d.errors import UserError

    base, teacher = camera_teacher
    features = view_cameras(["a red car, front view", "a red car", "a red car, back view"])
    assert features[1].abs().sum() == 0 and torch.equal(features[0], view_features(["front"])[0])
    assert features[0, 11] > 0 > features[2, 11]  # camera z: in front (+z) and behind
    prompts = ["a red car, front view", "a red car, back view"]
    kw = dict(steps=2, n=1, seed=0, progress=False, batch_size=2)
    seen = run_sample(prompts, tmp_path / "a", teacher=teacher, view_camera=True, **kw)
    run_sample(prompts, tmp_path / "b", teacher=teacher, **kw)
    assert seen["view_camera"] is True
    assert (tmp_path / "a/images/00000.png").read_bytes() != (tmp_path / "b/images/00000.png").read_bytes()
    with pytest.raises(UserError, match="view-aware"):
        run_sample(prompts, tmp_path / "c", teacher=base, view_camera=True, **kw)


@pytest.mark.parametrize("space", ["latent", "image"])
def test_camera_cfg_guides_from_an_unconditional_branch_without_the_camera(camera_teacher, space):
    """``camera_cfg``: uncond = no text and no camera, cond = text and camera; written out by hand per branch."""
    from text3d.guidance.core import score_gradient
    from text3d.guidance.sds import SDSConfig
    from text3d.teacher.sampling import predict_x0

    base, teacher = camera_teacher
    z, t, cond, uncond = _inputs(teacher)
    cams = spherical_cameras(20.0, [0.0, 180.0], 2.8, 42.0)
    image = torch.rand(2, 3, 64, 64)
    noise = torch.randn_like(z)
    with torch.no_grad():
        noisy = teacher.add_noise(z, noise, t)
        with teacher.viewing(cams):
            e_cond = teacher.predict_eps(noisy, t, cond)
            both = teacher.predict_eps_many(noisy, t, [uncond, cond], no_camera=(0,))
        e_uncond = teacher.predict_eps(noisy, t, uncond)  # outside viewing: the "no camera" input
        assert torch.allclose(both[0], e_uncond, atol=1e-5) and torch.allclose(both[1], e_cond, atol=1e-5)

        def gradient(camera_cfg):
            with teacher.viewing(cams):
                return score_gradient(teacher, z, t, noise, cond, uncond,
                                      SDSConfig(guidance_scale=7.5, space=space, camera_cfg=camera_cfg), image=image)

        if space == "latent":
            expected = (1.0 - teacher.alpha_bar(t)).view(-1, 1, 1, 1) * (e_uncond + 7.5 * (e_cond - e_uncond) - noise)
        else:
            decode = lambda e: teacher.decode_latents(predict_x0(teacher, noisy, e, t))  # noqa: E731
            d_uncond, d_cond = decode(e_uncond), decode(e_cond)
            expected = image - (d_uncond + 7.5 * (d_cond - d_uncond)).clamp(0.0, 1.0)
        got = gradient(True)
        assert torch.allclose(got, expected, atol=1e-4)
        assert not torch.allclose(got, gradient(False), atol=1e-4)  # the camera in both branches: another gradient


def test_suffix_drop_leaves_the_view_to_the_camera(tmp_path, monkeypatch):
    """--suffix-drop: examples that keep their camera see their caption without its view suffix, so the facing
    direction has to come from the camera; with it off, the suffixed captions are seen."""
    import transformers

    from test_teacher_training import TINY, quiet, tiny_config
    from text3d.errors import UserError
    from text3d.prompts import split_view_suffix
    from text3d.teacher_training.data import load_dataset, write_fake_dataset
    from text3d.teacher_training.finetune import finetune_teacher
    from text3d.teacher_training.run import train_teacher

    data_dir = write_fake_dataset(tmp_path / "data", n=24, seed=3)
    data = load_dataset(data_dir)
    init_cfg = tiny_config(tmp_path / "init", arch=TINY, unet_steps=1)
    train_teacher(init_cfg, data, data_path=data_dir, log=quiet)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(Path(init_cfg.out) / "tokenizer")
    seen: list[str] = []
    forward = transformers.CLIPTextModel.forward

    def recording(self, input_ids=None, *args, **kwargs):
        if self.training:
            seen.extend(tokenizer.batch_decode(input_ids, skip_special_tokens=True))
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(transformers.CLIPTextModel, "forward", recording)

    def views_seen(suffix_drop: float, name: str) -> int:
        seen.clear()
        cfg = tiny_config(tmp_path / name, unet_steps=6, lr=1e-2, cond_drop=0.0)
        finetune_teacher(cfg, data, Path(init_cfg.out), view_repeat=2, replay=24, log=quiet, camera_drop=0.0,
                         suffix_drop=suffix_drop)
        assert len(seen) == 6 * cfg.batch_size
        return sum(split_view_suffix(s.replace(" ,", ","))[1] is not None for s in seen)

    assert views_seen(0.0, "keep") > 0
    assert views_seen(1.0, "drop") == 0
    assert "without its view suffix" in (tmp_path / "drop" / "teacher" / "README.md").read_text()
    with pytest.raises(UserError, match="needs --camera-drop"):
        finetune_teacher(tiny_config(tmp_path / "x"), data, Path(init_cfg.out), log=quiet, suffix_drop=0.5)


def test_camera_drop_max_elevation_keeps_the_camera_of_views_from_above(tmp_path, monkeypatch):
    """--camera-drop-max-elevation: only examples seen from at most that high lose their camera, so "no camera"
    stands for the usual views; every example above it is trained with its camera."""
    import diffusers
    import numpy as np

    from test_teacher_training import TINY, quiet, tiny_config
    from text3d.errors import UserError
    from text3d.teacher_training.data import load_dataset, write_fake_dataset
    from text3d.teacher_training.finetune import finetune_teacher
    from text3d.teacher_training.run import train_teacher

    data_dir = write_fake_dataset(tmp_path / "data", n=24, seed=4)
    data = load_dataset(data_dir)
    init_cfg = tiny_config(tmp_path / "init", arch=TINY, unet_steps=1)
    train_teacher(init_cfg, data, data_path=data_dir, log=quiet)
    rows: list[torch.Tensor] = []
    forward = diffusers.UNet2DConditionModel.forward

    def recording(self, *args, class_labels=None, **kwargs):
        if self.training and class_labels is not None:
            rows.append(class_labels.detach().cpu())
        return forward(self, *args, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "forward", recording)
    threshold = float(np.median(data.arrays["elevation"]))

    def cameras_seen(max_elevation, name: str) -> torch.Tensor:
        rows.clear()
        cfg = tiny_config(tmp_path / name, unet_steps=4, cond_drop=0.0)
        finetune_teacher(cfg, data, Path(init_cfg.out), replay=24, log=quiet, camera_drop=1.0,
                         camera_drop_max_elevation=max_elevation)
        return torch.cat(rows)

    assert not cameras_seen(None, "all").any()  # a drop of 1 takes every camera
    seen = cameras_seen(threshold, "above")
    kept = seen[seen.abs().sum(dim=1) > 0]
    assert 0 < len(kept) < len(seen)  # the views from above kept theirs, the others lost it
    position = kept[:, [3, 7, 11]]
    elevation = torch.rad2deg(torch.asin(position[:, 1] / position.norm(dim=1)))
    assert (elevation > threshold - 1e-3).all(), (elevation.min(), threshold)
    assert f"at most {threshold:g} degrees" in (tmp_path / "above" / "teacher" / "README.md").read_text()
    # nearer than the usual 2.6 (toyworld render --min-radius): those keep their camera too, whatever their elevation
    radius = np.asarray(data.arrays["radius"]).copy()
    radius[::2] = 2.0
    data.arrays["radius"] = radius
    seen = cameras_seen(threshold, "near")
    kept = seen[seen.abs().sum(dim=1) > 0]
    position = kept[:, [3, 7, 11]]
    distance = position.norm(dim=1)
    elevation = torch.rad2deg(torch.asin(position[:, 1] / distance))
    assert (distance < 2.5).any() and ((elevation > threshold - 1e-3) | (distance < 2.5)).all()
    assert ((elevation <= threshold + 1e-3) & (distance < 2.5)).any()  # a low view kept its camera for being near
    with pytest.raises(UserError, match="needs --camera-drop"):
        finetune_teacher(tiny_config(tmp_path / "x"), data, Path(init_cfg.out), log=quiet,
                         camera_drop_max_elevation=30.0)


@pytest.mark.parametrize("space", ["latent", "image"])
def test_camera_guidance_adds_the_views_own_direction(camera_teacher, space):
    """``camera_guidance = w``: CFG as usual (uncond and cond both with the camera) plus w (cond - cond without the
    camera), written out by hand per branch; on a teacher without a camera input it changes nothing."""
    from text3d.guidance.core import score_gradient
    from text3d.guidance.sds import SDSConfig
    from text3d.teacher.sampling import predict_x0

    base, teacher = camera_teacher
    z, t, cond, uncond = _inputs(teacher)
    cams = spherical_cameras(20.0, [0.0, 180.0], 2.8, 42.0)
    image = torch.rand(2, 3, 64, 64)
    noise = torch.randn_like(z)
    scale, w = 5.0, 3.0
    with torch.no_grad():
        noisy = teacher.add_noise(z, noise, t)
        with teacher.viewing(cams):
            e_uncond, e_cond = teacher.predict_eps(noisy, t, uncond), teacher.predict_eps(noisy, t, cond)
        e_plain = teacher.predict_eps(noisy, t, cond)  # outside viewing: the "no camera" input
        assert not torch.allclose(e_plain, e_cond, atol=1e-4)

        def gradient(t_, cfg, model):
            with model.viewing(cams):
                return score_gradient(model, z, t_, noise, cond, uncond, cfg, image=image)

        cfg = SDSConfig(guidance_scale=scale, space=space, camera_guidance=w)
        if space == "latent":
            guided = e_uncond + scale * (e_cond - e_uncond) + w * (e_cond - e_plain)
            expected = (1.0 - teacher.alpha_bar(t)).view(-1, 1, 1, 1) * (guided - noise)
        else:
            decode = lambda e: teacher.decode_latents(predict_x0(teacher, noisy, e, t))  # noqa: E731
            d_uncond, d_cond, d_plain = decode(e_uncond), decode(e_cond), decode(e_plain)
            expected = image - (d_uncond + scale * (d_cond - d_uncond) + w * (d_cond - d_plain)).clamp(0.0, 1.0)
        assert torch.allclose(gradient(t, cfg, teacher), expected, atol=1e-4)
        without = SDSConfig(guidance_scale=scale, space=space)
        assert not torch.allclose(gradient(t, cfg, teacher), gradient(t, without, teacher), atol=1e-4)
        # a teacher without a camera input: no third branch, the plain CFG gradient
        assert torch.allclose(gradient(t, cfg, base), gradient(t, without, base), atol=1e-5)
