"""VSD: the LoRA score network starts at the teacher, the gradient is w(t)(eps_cfg - eps_lora), the LoRA
learns, particles are independent, and a resumed VSD run is bit-identical to an uninterrupted one."""

import pytest
import torch

from tests.helpers import FAST, assert_same_state, checkpoint_state
from text3d.cameras import CameraSamplerConfig, sample_cameras
from text3d.generate.config import load_config
from text3d.guidance import VSDConfig, VSDGuidance
from text3d.guidance.lora import LoRAScoreConfig, LoRAScoreNetwork
from text3d.cameras import camera_features
from text3d.teacher import load_teacher
from text3d.generate.run import generate, resume

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb(network: LoRAScoreNetwork, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def test_fresh_lora_predicts_the_teachers_conditional_eps(teacher):
    torch.manual_seed(0)
    lora = LoRAScoreNetwork(teacher, rank=4, condition_dim=16)
    latents = torch.randn(2, 4, 16, 16)
    t = torch.tensor([50, 900])
    cond = teacher.encode_prompts(["a red cube, front view", "a blue torus"])
    cams = sample_cameras(CameraSamplerConfig(), 2)
    with torch.no_grad():
        plain = teacher.predict_eps(latents, t, cond)
        adapted = lora.predict_eps(latents, t, cond, camera_features(cams))
    assert torch.equal(plain, adapted)
    # once trained (here: perturbed), the adapters and the camera change the prediction, and only inside
    _perturb(lora)
    with torch.no_grad():
        moved = lora.predict_eps(latents, t, cond, camera_features(cams))
        other_camera = lora.predict_eps(latents, t, cond, torch.zeros(2, 16))
        after = teacher.predict_eps(latents, t, cond)
    assert (moved - plain).abs().max() > 1e-4
    assert (moved - other_camera).abs().max() > 1e-6
    assert torch.equal(after, plain)  # the teacher itself is untouched outside `active()`
    lora.remove()


def test_adapter_switch_by_flag_matches_peft_enable_adapters(teacher):
    """The adapters switched by the flag their forward reads give the predictions of peft's own
    ``enable_adapters`` switch, on and off, and the fallback keeps the weights trainable as the flag path does."""
    torch.manual_seed(3)
    lora = LoRAScoreNetwork(teacher, rank=4, condition_dim=16)
    assert lora._flag_switch  # the installed peft keeps the flag where the fast path expects it
    _perturb(lora)
    latents, t = torch.randn(2, 4, 16, 16), torch.tensor([100, 700])
    cond = teacher.encode_prompts(["a red car, front view", "a grey cube"])
    condition = camera_features(sample_cameras(CameraSamplerConfig(), 2))
    outputs = {}
    for flag in (True, False):
        lora._flag_switch = flag
        with torch.no_grad():
            outputs[flag] = (lora.predict_eps(latents, t, cond, condition), teacher.predict_eps(latents, t, cond))
        assert all(p.requires_grad for p in lora.lora_parameters())
    assert torch.equal(outputs[True][0], outputs[False][0]) and torch.equal(outputs[True][1], outputs[False][1])
    assert (outputs[True][0] - outputs[True][1]).abs().max() > 1e-4  # on inside, off outside
    lora.remove()



def test_vsd_gradient_reaching_latents(teacher):
    torch.manual_seed(1)
    scale = 7.5
    guidance = VSDGuidance(teacher, VSDConfig(guidance_scale=scale))
    _perturb(guidance.lora, seed=3)  # a non-trivial LoRA so the baseline differs from the teacher
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    latents = teacher.encode_images(images)
    latents.retain_grad()
    t = torch.tensor([120, 640])
    noise = torch.randn(latents.shape)
    cams = sample_cameras(CameraSamplerConfig(), 2)
    prompts = ["a red cube, front view", "a red cube, back view"]
    out = guidance.guide_latents(latents, prompts, cameras=cams, t=t, noise=noise)
    out.loss.backward()

    # written out: CFG on a plain teacher call over the batch [uncond, cond] (one call, as SD pipelines make
    # it: two calls of half the batch differ from it by float32 rounding that CFG 7.5 amplifies past 1e-5),
    # then the LoRA call with the adapters on
    with torch.no_grad():
        ab = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        cond = teacher.encode_prompts(prompts)
        both = teacher.unet(torch.cat([noisy, noisy]), torch.cat([t, t]),
                            encoder_hidden_states=torch.cat([teacher.encode_prompts(["", ""]), cond])).sample
        eps_u, eps_c = both.chunk(2)
        eps_cfg = eps_u + scale * (eps_c - eps_u)
        with guidance.lora.active(camera_features(cams)):
            eps_lora = teacher.unet(noisy, t, encoder_hidden_states=cond).sample
        expected = (1 - ab) * (eps_cfg - eps_lora)
    assert (eps_lora - eps_c).abs().max() > 1e-4
    assert torch.allclose(latents.grad, expected, atol=1e-5, rtol=1e-4)
    assert torch.allclose(out.grad, expected, atol=1e-5, rtol=1e-4)
    guidance.lora.remove()


def test_image_space_vsd_compares_with_the_loras_decoded_x0(teacher):
    """space=image: grad = image_weight * (decode(x0 of the LoRA) - clamp(CFG of the decoded teacher x0s))."""
    torch.manual_seed(2)
    scale = 5.0
    guidance = VSDGuidance(teacher, VSDConfig(guidance_scale=scale, space="image"))
    _perturb(guidance.lora, seed=4)
    images = torch.rand(2, 3, teacher.image_size, teacher.image_size, requires_grad=True)
    with torch.no_grad():
        latents = teacher.encode_images(images)
    t = torch.tensor([300, 850])
    noise = torch.randn(latents.shape)
    cams = sample_cameras(CameraSamplerConfig(), 2)
    prompts = ["a red cube, side view", "a blue torus"]
    out = guidance(images, prompts, cameras=cams, t=t, noise=noise)
    out.loss.backward()
    with torch.no_grad():
        ab = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        cond = teacher.encode_prompts(prompts)
        both = teacher.unet(torch.cat([noisy, noisy]), torch.cat([t, t]),
                            encoder_hidden_states=torch.cat([teacher.encode_prompts(["", ""]), cond])).sample
        with guidance.lora.active(camera_features(cams)):
            eps_lora = teacher.unet(noisy, t, encoder_hidden_states=cond).sample
        x0 = {k: teacher.decode_latents((noisy - (1 - ab).sqrt() * e) / ab.sqrt())
              for k, e in zip(("u", "c", "lora"), (*both.chunk(2), eps_lora))}
        expected = x0["lora"] - (x0["u"] + scale * (x0["c"] - x0["u"])).clamp(0, 1)
    assert torch.allclose(out.grad, expected, atol=2e-4, rtol=1e-4)
    assert torch.allclose(images.grad, out.grad, atol=2e-4, rtol=1e-4)  # same size: no resize in between
    assert (x0["lora"] - x0["c"]).abs().max() > 1e-3  # the baseline is the LoRA's, not the teacher's
    guidance.lora.remove()



def test_relative_baseline_cancels_the_vae_round_trip(teacher):
    """vsd.relative_baseline: the image-space gradient becomes image + D(x0_LoRA) - D(x) - real, i.e. the plain
    VSD gradient plus the round trip's error image - D(E(image)); with an exact LoRA fit it would be SDS's."""
    torch.manual_seed(7)
    guidance = VSDGuidance(teacher, VSDConfig(guidance_scale=5.0, space="image", cfg_rescale=1.0))
    _perturb(guidance.lora, seed=5)
    images = torch.rand(2, 3, teacher.image_size, teacher.image_size)
    t, cams = torch.tensor([200, 700]), sample_cameras(CameraSamplerConfig(), 2)
    with torch.no_grad():
        latents = teacher.encode_images(images)
        round_trip = teacher.decode_latents(latents)
    noise = torch.randn(latents.shape)
    prompts = ["a grey cube, front view", "a yellow house"]
    plain = guidance(images, prompts, cameras=cams, t=t, noise=noise).grad
    guidance.cfg.relative_baseline = True
    relative = guidance(images, prompts, cameras=cams, t=t, noise=noise).grad
    assert (images - round_trip).abs().max() > 1e-2  # the tiny VAE's round trip is off: the test can fail
    assert torch.allclose(relative - plain, images - round_trip, atol=1e-4)
    guidance.lora.remove()

def test_sds_warmup_guides_as_sds_while_the_lora_trains(teacher):
    """vsd.sds_warmup: before that fraction of the run the gradient is SDS's (the render as baseline), after it the
    LoRA's; the LoRA trains in both."""
    from text3d.guidance import SDSConfig, SDSGuidance

    torch.manual_seed(3)
    guidance = VSDGuidance(teacher, VSDConfig(guidance_scale=5.0, space="image", sds_warmup=0.5))
    sds = SDSGuidance(teacher, SDSConfig(guidance_scale=5.0, space="image"))
    _perturb(guidance.lora, seed=5)
    images = torch.rand(2, 3, teacher.image_size, teacher.image_size)
    with torch.no_grad():
        latents = teacher.encode_images(images)
    t, noise = torch.tensor([300, 850]), torch.randn(latents.shape)
    cams = sample_cameras(CameraSamplerConfig(), 2)
    prompts = ["a red cube, side view", "a blue torus"]
    expected = sds(images, prompts, cameras=cams, t=t, noise=noise).grad
    early = guidance(images, prompts, progress=0.25, cameras=cams, t=t, noise=noise)
    assert torch.allclose(early.grad, expected, atol=1e-6)
    before = {k: v.clone() for k, v in guidance.lora.lora_state_dict().items()}
    guidance.update(early, prompts, cams)
    assert any(not torch.equal(before[k], v) for k, v in guidance.lora.lora_state_dict().items())
    late = guidance(images, prompts, progress=0.75, cameras=cams, t=t, noise=noise)
    assert (late.grad - expected).abs().max() > 1e-3  # the LoRA's baseline from here on
    guidance.lora.remove()
    from text3d.errors import ConfigError

    with pytest.raises(ConfigError, match="vsd.sds_warmup must be in"):
        load_config(overrides=["guidance=vsd", "vsd.sds_warmup=1.5"])


def test_lora_interval_trains_the_lora_on_one_step_in_k(teacher):
    """vsd.lora_interval=2: the LoRA trains on steps 0, 2, ... (fused in the guidance call or in update()) and is
    left alone on the others; the step count travels in the guidance's state, so a resumed run keeps the rhythm."""
    from text3d.errors import ConfigError

    torch.manual_seed(4)
    images = torch.rand(2, 3, teacher.image_size, teacher.image_size)
    cams = sample_cameras(CameraSamplerConfig(), 2)
    prompts = ["a red cube, side view", "a blue torus"]
    for fused in (True, False):
        guidance = VSDGuidance(teacher, VSDConfig(guidance_scale=5.0, space="image", fused_lora=fused,
                                                  lora_interval=2, lora=LoRAScoreConfig(
                                                      rank=4, alpha=4.0, lr=1e-2, camera_condition=True,
                                                      camera_drop=0.0)))
        trained = []
        for step in range(4):
            before = {k: v.clone() for k, v in guidance.lora.lora_state_dict().items()}
            out = guidance(images, prompts, progress=step / 4, cameras=cams)
            stats = guidance.update(out, prompts, cams)
            after = guidance.lora.lora_state_dict()
            trained.append(any(not torch.equal(before[k], after[k]) for k in before))
            assert ("lora_loss" in stats) == trained[-1]
        assert trained == [True, False, True, False], (fused, trained)
        state = guidance.state_dict()
        assert state["steps"] == 4
        guidance.load_state_dict({**state, "steps": 5})
        assert not guidance.lora_trains
        guidance.load_state_dict({k: v for k, v in state.items() if k != "steps"})  # an older checkpoint
        assert guidance.steps_taken == 0 and guidance.lora_trains
        guidance.lora.remove()
    with pytest.raises(ConfigError, match="vsd.lora_interval must be >= 1"):
        load_config(overrides=["guidance=vsd", "vsd.lora_interval=0"])


def test_one_lora_step_lowers_its_loss_on_a_fixed_batch(teacher):
    torch.manual_seed(2)
    guidance = VSDGuidance(teacher, VSDConfig(lora=LoRAScoreConfig(rank=4, alpha=4.0, lr=1e-2, camera_condition=True)))
    latents = teacher.encode_images(torch.rand(4, 3, 64, 64)).detach()
    cond = teacher.encode_prompts(["a red cube"] * 4)
    t = torch.tensor([100, 300, 500, 700])
    noise = torch.randn(latents.shape)
    cams = camera_features(sample_cameras(CameraSamplerConfig(), 4))
    before = guidance.lora.denoising_loss(latents, cond, t, noise, cams)
    guidance.optimizer.zero_grad()
    before.backward()
    guidance.optimizer.step()
    with torch.no_grad():
        after = guidance.lora.denoising_loss(latents, cond, t, noise, cams)
    assert float(after) < float(before.detach())
    assert all(p.grad is None for p in teacher.unet.parameters() if not p.requires_grad)  # base stays frozen
    guidance.lora.remove()


def test_a_lora_step_trains_the_lora_weights_themselves(teacher):
    """The adapters' own weights (not only the camera MLP) get gradients and move, also when the loss is
    backpropagated after the adapters were switched off again (peft's switch clears requires_grad)."""
    torch.manual_seed(3)
    guidance = VSDGuidance(teacher, VSDConfig(lora=LoRAScoreConfig(rank=4, alpha=4.0, lr=1e-2, camera_condition=True)))
    lora = guidance.lora
    b_weights = {n: p.detach().clone() for n, p in lora._lora_params.items() if "lora_B" in n}
    assert b_weights and all(float(w.abs().max()) == 0.0 for w in b_weights.values())  # peft starts B at zero
    latents = teacher.encode_images(torch.rand(2, 3, 64, 64)).detach()
    loss = lora.denoising_loss(latents, teacher.encode_prompts(["a red cube"] * 2), torch.tensor([200, 600]),
                               torch.randn(latents.shape))
    guidance.optimizer.zero_grad()
    loss.backward()
    assert all(lora._lora_params[n].grad is not None and float(lora._lora_params[n].grad.abs().max()) > 0
               for n in b_weights)
    guidance.optimizer.step()
    assert all(float(lora._lora_params[n].detach().abs().max()) > 0 for n in b_weights)
    assert not any(p.requires_grad for n, p in teacher.unet.named_parameters() if "lora_" not in n)
    lora.remove()


def _vsd_cfg(teacher_dir, steps, particles=2):
    cfg = load_config(overrides=FAST + [f"teacher.name_or_path={teacher_dir}", f"train.steps={steps}", "seed=3",
                                        "guidance=vsd", f"train.particles={particles}", "vsd.lora.lr=0.01",
                                        "train.albedo_warmup=0.2"])
    cfg.prompt = "a blue torus"
    return cfg


def test_particles_do_not_share_parameters(tiny_teacher_dir, tmp_path):
    from text3d.generate.trainer import AssetTrainer

    cfg = _vsd_cfg(tiny_teacher_dir, 1)
    teacher = load_teacher(str(tiny_teacher_dir), "cpu")
    trainer = AssetTrainer(cfg, teacher, torch.device("cpu"), tmp_path)
    a, b = trainer.particles
    ptrs_a = {p.data_ptr() for p in a.parameters()}
    assert ptrs_a.isdisjoint(p.data_ptr() for p in b.parameters())
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # a step updates exactly the particle it drew
    before = [{k: v.clone() for k, v in r.state_dict().items()} for r in trainer.particles]
    torch.manual_seed(0)
    drawn = int(torch.randint(2, ()))
    torch.manual_seed(0)
    trainer.train_step(1)
    changed = [any(not torch.equal(v, r.state_dict()[k]) for k, v in s.items() if v.is_floating_point())
               for r, s in zip(trainer.particles, before)]
    assert changed == [i == drawn for i in range(2)]
    trainer.guidance.lora.remove()


def test_vsd_resume_restores_lora_and_particles_bit_for_bit(tiny_teacher_dir, tmp_path):
    full = generate(_vsd_cfg(tiny_teacher_dir, 6), out=tmp_path / "full", show_progress=False, video=False)

    class Kill(Exception):
        pass

    def crash(trainer, step, stats):
        if step == 4:
            raise Kill

    with pytest.raises(Kill):
        generate(_vsd_cfg(tiny_teacher_dir, 6), out=tmp_path / "crashed", show_progress=False, callbacks=[crash])
    crashed = checkpoint_state(tmp_path / "crashed")
    assert crashed["step"] == 3 and len(crashed["particles"]) == 2
    initial = generate(_vsd_cfg(tiny_teacher_dir, 1), out=tmp_path / "one", show_progress=False, video=False)
    lora_start = checkpoint_state(initial.run_dir)["guidance"]["lora"]
    assert any(not torch.equal(crashed["guidance"]["lora"][k], lora_start[k]) for k in lora_start)  # it trained
    resume(tmp_path / "crashed", show_progress=False, video=False)
    assert_same_state(checkpoint_state(full.run_dir), checkpoint_state(tmp_path / "crashed"))
    for i in range(2):  # both particles exported
        assert list((full.run_dir / f"particle_{i}").glob("*.glb"))
    assert (full.run_dir / "preview.png").is_file()


def test_cli_vsd_with_two_particles_then_eval(tiny_teacher_dir, tmp_path):
    import json

    from tests.helpers import run_cli

    out = tmp_path / "run"
    result = run_cli("generate", "a blue torus", "--guidance", "vsd", "--particles", "2", "--steps", "4",
                     "--teacher", str(tiny_teacher_dir), "--out", str(out), "-q", "--no-video", *FAST)
    assert result.returncode == 0, result.stderr
    cfg_text = (out / "config.yaml").read_text()
    assert "guidance: vsd" in cfg_text and "t_max_end: 0.5" in cfg_text  # text3d/configs/vsd.yaml was applied
    assert "space: image" in cfg_text and "relative_baseline: true" in cfg_text and "lora_interval: 3" in cfg_text
    summary = json.loads((out / "run.json").read_text())
    assert summary["particles"] == 2 and set(summary["files"]) >= {"particle_0", "particle_1", "preview"}
    assert set(summary["export_seconds"]) == {"particle_0", "particle_1", "preview"}  # the split, per particle
    assert "seconds" not in summary["files"]["particle_0"] and "bake" in summary["export_seconds"]["particle_0"]
    scored = run_cli("eval", "run", str(out))
    assert scored.returncode == 0, scored.stderr
    report = json.loads((out / "eval.json").read_text())
    assert len(report["per_particle"]) == 2 and report["diversity"]["rgb_rms"] is not None
    assert "2 particles" in scored.stdout
