"""One score-distillation gradient: SDS, VSD, SwiftBrush, DMD and DMD2 all go through
:func:`text3d.guidance.core.score_gradient`, so the same noise and t give each method's gradient from that one
function, and patching it changes every method at once."""

import pytest
import torch

from tests.helpers import perturbed_lora
from text3d.distill2d.config import load_distill_config
from text3d.distill2d.trainer import Distill2DTrainer
from text3d.guidance import core
from text3d.guidance import SDSConfig, SDSGuidance, VSDConfig, VSDGuidance
from text3d.guidance.core import ScoreDistillation, score_gradient

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["batch_size=2", "regression.pairs=2", "regression.sampler_steps=2", "real_images=4", "sample_every=1000"]


def test_sds_and_swiftbrush_gradients_come_from_the_one_function(teacher):
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 16, 16)
    prompts = ["a red cube", "a blue torus"]
    cond, uncond = teacher.encode_prompts(prompts), teacher.encode_prompts(["", ""])
    t, noise = torch.tensor([150, 650]), torch.randn(2, 4, 16, 16)

    sds_cfg = SDSConfig(guidance_scale=7.0)
    sds = SDSGuidance(teacher, sds_cfg).guide_latents(latents.clone().requires_grad_(True), prompts, t=t, noise=noise)
    direct = score_gradient(teacher, latents, t, noise, cond, uncond, sds_cfg)
    assert direct.abs().max() > 1e-4
    assert torch.equal(sds.grad, direct)

    lora = perturbed_lora(teacher)
    sb_cfg = load_distill_config("swiftbrush").core  # SwiftBrush's preset: sigma2 weighting, CFG on both branches
    x = latents.clone().requires_grad_(True)
    swiftbrush = ScoreDistillation(teacher, sb_cfg, lora=lora).from_latents(x, cond, uncond, t=t, noise=noise)
    direct_sb = score_gradient(teacher, latents, t, noise, cond, uncond, sb_cfg, lora)
    assert torch.equal(swiftbrush.grad, direct_sb)
    assert not torch.allclose(direct_sb, direct)  # a different configuration, a different gradient
    # the SwiftBrush gradient is SDS's formula with the LoRA in place of the noise
    with torch.no_grad():
        noisy = teacher.add_noise(latents, noise, t)
        eps_real = teacher.predict_eps(noisy, t, cond, uncond, guidance_scale=sb_cfg.guidance_scale)
        eps_lora = lora.predict_eps(noisy, t, cond, uncond_embeddings=uncond, guidance_scale=sb_cfg.lora_guidance_scale)
        expected = (1 - teacher.alpha_bar(t)) * (eps_real - eps_lora)
    assert torch.allclose(direct_sb, expected, atol=1e-6)
    lora.remove()


def test_patching_the_one_function_changes_every_method(teacher, tiny_teacher_dir, tmp_path, monkeypatch):
    calls = []

    def patched(teacher_, latents, t, noise, cond, uncond, cfg, lora=None, condition=None, image=None,
                negatives=(), negative_weights=None):
        calls.append((cfg.weighting, lora is not None))
        shape = image.shape if cfg.space == "image" else latents.shape
        return torch.full(shape, 0.25)

    monkeypatch.setattr(core, "score_gradient", patched)
    images = torch.rand(2, 3, 64, 64)
    prompts = ["a red cube", "a red cube"]

    sds = SDSGuidance(teacher, SDSConfig())(images, prompts)
    vsd_guidance = VSDGuidance(teacher, VSDConfig())
    vsd = vsd_guidance(images, prompts)
    vsd_guidance.lora.remove()
    assert torch.all(sds.grad == 0.25) and torch.all(vsd.grad == 0.25)
    assert calls == [("sigma2", False), ("sigma2", True)]

    for method, weighting in (("swiftbrush", "sigma2"), ("dmd", "dmd"), ("dmd2", "dmd")):
        calls.clear()
        cfg = load_distill_config(method, overrides=[*SMALL, f"teacher={tiny_teacher_dir}", "fake.steps=1"])
        trainer = Distill2DTrainer(cfg, tmp_path / method, show_progress=False)
        stats, x0, _ = trainer.student_step()
        trainer.fake.remove()
        assert calls == [(weighting, True)], method
        # the student step's score gradient is the patched one: 0.25 everywhere
        assert stats["score_grad"] == pytest.approx(0.25 * x0[0].numel() ** 0.5, rel=1e-6), method
