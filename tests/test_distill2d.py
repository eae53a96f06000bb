"""2D distillation: the shared score-difference core gives SwiftBrush's and DMD's gradients exactly, a
DMD2 iteration steps the fake score N times per student step, a resumed run matches an uninterrupted
one, and the saved student loads through the SD loading path and samples in one step."""

import json

import pytest
import torch

from tests.helpers import REPO, perturbed_lora, run_cli
from text3d.distill2d.config import load_distill_config
from text3d.distill2d.run import distill, resume_distill
from text3d.guidance.core import ScoreConfig, ScoreDistillation
from text3d.distill2d.student import Student
from text3d.distill2d.trainer import Distill2DTrainer
from text3d.errors import ConfigError
from text3d.guidance.lora import LoRAScoreNetwork
from text3d.teacher import load_teacher
from text3d.teacher.sampling import predict_x0

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["batch_size=2", "regression.pairs=4", "regression.sampler_steps=2", "real_images=8",
         "sample_every=1000", "checkpoint_every=2", "log_every=1"]


def _plain_eps(teacher, noisy, t, cond, uncond, scale, lora=None):
    """eps with the CFG formula written out, from plain UNet calls (adapters on for the LoRA)."""
    def unet(emb):
        return teacher.unet(noisy, t, encoder_hidden_states=emb).sample

    if lora is None:
        e_c, e_u = unet(cond), unet(uncond)
    else:
        with lora.active():
            e_c, e_u = unet(cond), unet(uncond)
    return e_u + scale * (e_c - e_u)


def _student_x0(teacher):
    torch.manual_seed(0)
    student = Student(teacher)
    cond = teacher.encode_prompts(["a red cube", "a blue torus, side view"])
    x0 = student.x0(torch.randn(2, 4, 16, 16), 999, cond)
    x0.retain_grad()
    return student, x0, cond


def test_swiftbrush_gradient_is_sigma2_times_score_difference(teacher):
    student, x0, cond = _student_x0(teacher)
    lora = perturbed_lora(teacher)
    uncond = teacher.encode_prompts(["", ""])
    core = ScoreDistillation(teacher, ScoreConfig(4.5, 4.5, "sigma2", reduction="sum"), lora=lora)
    t, noise = torch.tensor([200, 800]), torch.randn(2, 4, 16, 16)
    out = core.from_latents(x0, cond, uncond, t=t, noise=noise)
    out.loss.backward()
    with torch.no_grad():
        ab = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        expected = (1 - ab) * (_plain_eps(teacher, noisy, t, cond, uncond, 4.5)
                               - _plain_eps(teacher, noisy, t, cond, uncond, 4.5, lora))
    assert expected.abs().max() > 1e-4
    assert torch.allclose(x0.grad, expected, atol=1e-5, rtol=1e-4)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.unet.parameters())  # reaches the student
    lora.remove()


def test_dmd_gradient_is_the_normalised_x0_difference(teacher):
    student, x0, cond = _student_x0(teacher)
    lora = perturbed_lora(teacher, seed=1)
    uncond = teacher.encode_prompts(["", ""])
    core = ScoreDistillation(teacher, ScoreConfig(3.0, 1.0, "dmd", reduction="sum"), lora=lora)
    t, noise = torch.tensor([300, 600]), torch.randn(2, 4, 16, 16)
    out = core.from_latents(x0, cond, uncond, t=t, noise=noise)
    out.loss.backward()
    with torch.no_grad():
        ab = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        real = (noisy - (1 - ab).sqrt() * _plain_eps(teacher, noisy, t, cond, uncond, 3.0)) / ab.sqrt()
        with lora.active():
            eps_fake = teacher.unet(noisy, t, encoder_hidden_states=cond).sample  # fake score without CFG
        fake = (noisy - (1 - ab).sqrt() * eps_fake) / ab.sqrt()
        norm = (x0 - real).abs().mean(dim=(1, 2, 3), keepdim=True)
        expected = (fake - real) / norm
    assert torch.allclose(x0.grad, expected, atol=1e-4, rtol=1e-4)
    lora.remove()


def test_dmd_gradient_vanishes_when_fake_score_is_the_teacher_without_cfg(teacher):
    _, x0, cond = _student_x0(teacher)
    lora = LoRAScoreNetwork(teacher, rank=4)  # fresh: B = 0, so exactly the teacher
    core = ScoreDistillation(teacher, ScoreConfig(1.0, 1.0, "dmd", reduction="sum"), lora=lora)
    out = core.from_latents(x0, cond, teacher.encode_prompts(["", ""]))
    assert out.grad.abs().max() == 0.0
    # and with CFG on the real branch it does not vanish
    core.cfg = ScoreConfig(4.0, 1.0, "dmd", reduction="sum")
    assert core.from_latents(x0, cond, teacher.encode_prompts(["", ""])).grad.abs().max() > 0
    lora.remove()


def test_image_space_dmd_gradient_is_the_normalised_decoded_difference(teacher):
    """core.space=image: CFG on the decoded real x0s, gradient on D(x), sent back through the decoder."""
    student, x0, cond = _student_x0(teacher)
    lora = perturbed_lora(teacher, seed=2)
    uncond = teacher.encode_prompts(["", ""])
    core = ScoreDistillation(teacher, ScoreConfig(3.0, 1.0, "dmd", reduction="sum", space="image"), lora=lora)
    t, noise = torch.tensor([250, 700]), torch.randn(2, 4, 16, 16)
    out = core.from_latents(x0, cond, uncond, t=t, noise=noise)
    out.loss.backward()
    with torch.no_grad():
        ab = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * x0 + (1 - ab).sqrt() * noise

        def decoded(eps):
            return teacher.decode_latents((noisy - (1 - ab).sqrt() * eps) / ab.sqrt())

        real = (decoded(_plain_eps(teacher, noisy, t, cond, uncond, 0.0))  # uncond branch
                + 3.0 * (decoded(_plain_eps(teacher, noisy, t, cond, uncond, 1.0))
                         - decoded(_plain_eps(teacher, noisy, t, cond, uncond, 0.0)))).clamp(0, 1)
        with lora.active():
            fake = decoded(teacher.unet(noisy, t, encoder_hidden_states=cond).sample)
        image = teacher.decode_latents(x0, clamp=False)
        expected = (fake - real) / (image - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert out.grad.shape == image.shape and expected.abs().max() > 1e-3
    assert torch.allclose(out.grad, expected, atol=2e-4, rtol=1e-3)
    probe = x0.detach().clone().requires_grad_(True)  # x0's gradient is the decoder's adjoint of it
    teacher.decode_latents(probe, clamp=False).backward(out.grad)
    assert torch.allclose(x0.grad, probe.grad, atol=1e-4, rtol=1e-3)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.unet.parameters())
    # SwiftBrush's weighting with CFG on the fake branch too: D_cfg(fake) - D_cfg(real), no normalisation
    core.cfg = ScoreConfig(3.0, 2.0, "sigma2", reduction="sum", space="image")
    with torch.no_grad():
        with lora.active():
            fake_u, fake_c = (decoded(teacher.unet(noisy, t, encoder_hidden_states=e).sample) for e in (uncond, cond))
        fake_cfg = (fake_u + 2.0 * (fake_c - fake_u)).clamp(0, 1)
    assert torch.allclose(core.from_latents(x0, cond, uncond, t=t, noise=noise).grad, fake_cfg - real, atol=2e-4, rtol=1e-3)
    # fake score = the teacher and no CFG: nothing to learn
    lora.remove()
    fresh = LoRAScoreNetwork(teacher, rank=4)
    core = ScoreDistillation(teacher, ScoreConfig(1.0, 1.0, "dmd", reduction="sum", space="image"), lora=fresh)
    assert core.from_latents(x0, cond, uncond).grad.abs().max() == 0.0
    fresh.remove()


def test_student_x0_uses_the_schedules_alpha_bar(teacher):
    student = Student(teacher, timesteps=[999, 499])
    z, cond = torch.randn(1, 4, 16, 16), teacher.encode_prompts(["a red cube"])
    with torch.no_grad():
        eps = student.unet(z, torch.tensor([499]), encoder_hidden_states=cond).sample
        assert torch.allclose(student.x0(z, 499, cond), predict_x0(teacher, z, eps, 499), atol=1e-6)


def test_one_ttur_iteration_steps_the_fake_score_n_times_and_the_student_once(tiny_teacher_dir, tmp_path):
    cfg = load_distill_config("dmd2", overrides=[*SMALL, f"teacher={tiny_teacher_dir}", "fake.steps=3"])
    trainer = Distill2DTrainer(cfg, tmp_path, show_progress=False)
    student_before = [p.detach().clone() for p in trainer.student.unet.parameters()]
    trainer.train_step()
    assert trainer.counts == {"student_steps": 1, "fake_steps": 3}
    fake_steps = {int(s["step"]) for s in trainer.fake_optimizer.state.values()}
    student_steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert fake_steps == {3} and student_steps == {1}
    assert any(not torch.equal(a, b) for a, b in zip(student_before, trainer.student.unet.parameters()))
    lora_b = [p for n, p in trainer.fake._lora_params.items() if "lora_B" in n]  # zero at the start
    assert lora_b and all(float(p.detach().abs().max()) > 0 for p in lora_b)  # the fake score itself learned
    trainer.fake.remove()


def test_resume_matches_uninterrupted_run_and_student_reloads(tiny_teacher_dir, tmp_path):
    base = [*SMALL, f"teacher={tiny_teacher_dir}"]
    full = distill(load_distill_config("swiftbrush", overrides=[*base, "steps=4"]), tmp_path / "full",
                   show_progress=False, evaluate=False)
    distill(load_distill_config("swiftbrush", overrides=[*base, "steps=2"]), tmp_path / "part", show_progress=False,
            evaluate=False)
    first = json.loads((tmp_path / "part" / "summary.json").read_text())
    resumed = resume_distill(tmp_path / "part", ["steps=4"], show_progress=False, evaluate=False)
    assert resumed.steps == 4
    summary = json.loads((tmp_path / "part" / "summary.json").read_text())  # training time adds up over resumes
    assert summary["train_seconds_total"] > first["train_seconds_total"] > 0
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    for key in ("student", "fake"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key

    # the saved student is a Stable Diffusion folder: the SD loading path loads it, one step samples
    model = load_teacher(str(full.student), "cpu")
    assert all(torch.equal(model.unet.state_dict()[k].float(), v.float()) for k, v in a["student"].items())
    card = json.loads((full.student / "student.json").read_text())
    assert card["timesteps"] == [999] and card["guidance_scale"] == 1.0
    result = run_cli("sample", "a red cube", "--model", str(full.student), "--steps", "1", "-n", "2", "--out",
                     str(tmp_path / "samples"))
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "samples" / "prompts.json").read_text())
    assert record["steps"] == 1 and record["timesteps"] == [999] and len(record["images"]) == 2


def test_default_prompts_are_the_captions_the_teacher_was_trained_on():
    from text3d.distill2d.data import default_prompts
    from text3d.toyworld.catalog import all_captions, parse_caption, view_suffix_label

    prompts = default_prompts()
    assert len(prompts) == 4 * len(all_captions()) == 432  # plain, front, side, back; never overhead
    assert {view_suffix_label(p) for p in prompts} == {None, "front", "side", "back"}
    assert all(parse_caption(p) is not None for p in prompts)


def test_cli_trains_each_method_briefly_and_scores_it(tiny_teacher_dir, tmp_path):
    for method in ("swiftbrush", "dmd", "dmd2"):
        out = tmp_path / method
        # a hang guard, not a speed check: with other jobs on the 2 CI cores one run has taken over 300 s
        result = run_cli("distill2d", "--method", method, "--teacher", str(tiny_teacher_dir), "--steps", "2",
                         "--out", str(out), "-q", *SMALL, timeout=1200)
        assert result.returncode == 0, result.stderr
        assert "judge on 432" in result.stdout
        summary = json.loads((out / "summary.json").read_text())
        assert summary["scores"]["n_images"] == 432 and (out / "student" / "unet").is_dir()
        assert summary["fake_steps"] == 2 * (5 if method == "dmd2" else 1)


def test_regression_pairs_follow_the_run_length_unless_set():
    """regression.pairs unset: batch_size * steps pairs, at least 32 and at most max_pairs (the preset's count); a
    set value is kept."""
    assert load_distill_config("dmd").regression.pairs == 256  # the presets' runs: 300 x 8 and 600 x 16 pairs' worth
    assert load_distill_config("kd").regression.pairs == 1024
    assert load_distill_config("dmd", overrides=["steps=3"]).regression.pairs == 32
    assert load_distill_config("kd", overrides=["steps=10"]).regression.pairs == 160
    assert load_distill_config("kd", overrides=["steps=3", "regression.pairs=1024"]).regression.pairs == 1024
    assert load_distill_config("dmd", overrides=["steps=3", "regression.max_pairs=8"]).regression.pairs == 8
    with pytest.raises(ConfigError, match="max_pairs"):
        load_distill_config("dmd", overrides=["regression.max_pairs=0"])


def test_cli_dmd_short_run_makes_a_few_pairs_and_says_so(tiny_teacher_dir, tmp_path):
    out = tmp_path / "dmd"
    small = [o for o in SMALL if not o.startswith("regression.pairs=")]
    result = run_cli("distill2d", "--method", "dmd", "--teacher", str(tiny_teacher_dir), "--steps", "2",
                     "--out", str(out), "--no-eval", *small)
    assert result.returncode == 0, result.stderr
    assert "making 32 regression pairs for dmd's regression loss" in result.stderr
    assert str(out / "cache" / "regression_pairs.pt") in result.stderr
    assert "pairs: 32" in (out / "config.yaml").read_text()  # the number used, for a resumed run


def test_bad_config_is_one_line(tiny_teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match="timesteps"):
        load_distill_config("dmd2", overrides=["timesteps=[249,999]"])
    with pytest.raises(ConfigError, match="method"):
        load_distill_config("gan")
    result = run_cli("distill2d", "--method", "dmd", "core.weighting=foo", "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "core.weighting" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_runs_data_parallel_under_torchrun_unchanged(tiny_teacher_dir, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "text3d",
                             "distill2d", "--method", "swiftbrush", "--teacher", str(tiny_teacher_dir), "--steps", "2",
                             "--out", str(out), "-q", "--no-eval", "device=cpu", *SMALL],
                            capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["student_steps"] == 2
    assert (out / "student" / "unet").is_dir()


def test_distill_table_scores_each_model_and_reuses_measured_rows(tiny_teacher_dir, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("distill_table", REPO / "scripts" / "distill_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue mug, front view\n")
    args = ["--out", str(tmp_path / "t"), "--teacher", str(tiny_teacher_dir), "--teacher-steps", "2,1",
            "--prompts", str(prompts), "--student", f"plain, w=1={tiny_teacher_dir}@1#2"]  # a name with "="
    assert table.main(args) == 0
    rows = json.loads((tmp_path / "t" / "table.json").read_text())
    assert [(r["model"], r["steps"], r["n"]) for r in rows] == [("teacher, 2 DDIM steps", 2, 2),
                                                                ("teacher, 1 DDIM steps", 1, 2), ("plain, w=1", 2, 2)]
    assert rows[0]["view_front_back"] in (0.0, 1.0)  # one suffixed prompt of a front/back object
    assert [r["unet_passes_per_image"] for r in rows] == [4, 2, 2]  # DDIM steps x 2 (CFG); w = 1: one pass a step
    capsys.readouterr()
    assert table.main(args) == 0
    assert capsys.readouterr().out.count("reused") == 3
    assert json.loads((tmp_path / "t" / "table.json").read_text()) == rows

    # a model retrained in the same folder is measured again, not read from its old row
    import shutil

    from diffusers import UNet2DConditionModel

    copy = tmp_path / "copy"
    shutil.copytree(tiny_teacher_dir, copy)
    args = ["--out", str(tmp_path / "t"), "--teacher-steps", "", "--prompts", str(prompts),
            "--student", f"copy={copy}#1"]
    assert table.main(args) == 0
    unet = UNet2DConditionModel.from_pretrained(copy / "unet")
    with torch.no_grad():
        next(unet.parameters()).add_(0.01)
    unet.save_pretrained(copy / "unet")
    capsys.readouterr()
    assert table.main(args) == 0
    assert "reused" not in capsys.readouterr().out


def test_regression_pairs_cache_is_keyed_by_the_teacher_weights(tiny_teacher_dir, tmp_path, monkeypatch):
    """Cached (noise, teacher sample) pairs are reused for the same teacher and settings and remade when the
    teacher's weights change in the same folder (a retrained teacher must not inherit its old samples)."""
    from text3d.distill2d import data
    from text3d.distill2d.config import RegressionConfig
    from text3d.teacher import sampling

    cfg = RegressionConfig(pairs=2, sampler_steps=2, guidance_scale=2.0, batch_size=2)
    prompts, cache = ["a red cube", "a blue torus"], tmp_path / "pairs.pt"
    calls = []
    real = sampling.sample_latents
    monkeypatch.setattr(sampling, "sample_latents", lambda *a, **k: calls.append(1) or real(*a, **k))

    first = data.regression_pairs(load_teacher(str(tiny_teacher_dir), "cpu"), prompts, cfg, 0, cache, False)
    again = data.regression_pairs(load_teacher(str(tiny_teacher_dir), "cpu"), prompts, cfg, 0, cache, False)
    assert len(calls) == 1 and torch.equal(first["latents"], again["latents"])

    changed = load_teacher(str(tiny_teacher_dir), "cpu")
    with torch.no_grad():
        for p in changed.unet.parameters():
            p.mul_(1.5)
    remade = data.regression_pairs(changed, prompts, cfg, 0, cache, False)
    assert len(calls) == 2
    assert torch.equal(remade["noise"], first["noise"]) and not torch.allclose(remade["latents"], first["latents"])
