"""Knowledge, progressive and guided distillation: the PD target, the halving rounds, the w-conditioned
student at initialisation, the stochastic sampler's re-noise marginal, resume, and short CLI runs."""

import json

import pytest
import torch

from tests.helpers import run_cli
from text3d.distill2d.config import load_distill_config
from text3d.distill2d.run import distill
from text3d.distill2d.trajectory import TrajectoryTrainer, pd_rounds, plan, w_conditioned_unet
from text3d.teacher import load_teacher
from text3d.teacher.sampling import (ddim_step, ddim_timesteps, guidance_embedding, progressive_target, renoise_step,
                                     sample_latents)

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["batch_size=2", "regression.pairs=4", "regression.sampler_steps=2", "real_images=8", "log_every=1",
         "trajectory.start_steps=4", "trajectory.round_steps=2", "trajectory.stage1_steps=2", "checkpoint_every=1"]


def _alphas():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def test_progressive_target_reproduces_two_ddim_steps_of_a_linear_denoiser():
    alphas = _alphas()
    torch.manual_seed(0)
    weights = {t: torch.randn(4, 4) * 0.3 for t in (999, 749, 499, 249)}

    def eps_fn(z, t):  # a linear toy denoiser: eps = A_t z (mixing channels)
        return torch.einsum("ij,bjhw->bihw", weights[int(t)], z)

    z = torch.randn(3, 4, 2, 2)
    for t, t_mid, t_next in ((999, 749, 499), (499, 249, -1)):
        target = progressive_target(alphas, eps_fn, z, t, t_mid, t_next)
        two_steps = ddim_step(alphas, ddim_step(alphas, z, eps_fn(z, t), t, t_mid), eps_fn(
            ddim_step(alphas, z, eps_fn(z, t), t, t_mid), t_mid), t_mid, t_next)
        ab = alphas[t]
        implied_eps = (z - ab.sqrt() * target) / (1 - ab).sqrt()  # the student predicting x~ ...
        one_step = ddim_step(alphas, z, implied_eps, t, t_next)  # ... lands where the teacher's two steps land
        assert torch.allclose(one_step, two_steps, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(target, z)  # (sanity: the target is not the input)


def test_halving_rounds_and_phase_plans():
    assert pd_rounds(64, 1) == [(64, 32), (32, 16), (16, 8), (8, 4), (4, 2), (2, 1)]
    assert pd_rounds(16, 4) == [(16, 8), (8, 4)]
    pd = plan(load_distill_config("pd", overrides=["trajectory.start_steps=8"]))
    assert [(p.name, p.teacher_steps, p.student_steps) for p in pd] == [("pd_4", 8, 4), ("pd_2", 4, 2), ("pd_1", 2, 1)]
    guided = plan(load_distill_config("guided", overrides=["trajectory.start_steps=4"]))
    assert [p.name for p in guided] == ["guided_w", "guided_pd_2", "guided_pd_1"]
    assert all(p.w_conditioned for p in guided)
    # the student grid is every other step of the teacher's grid
    assert ddim_timesteps(1000, 8).tolist()[::2] == ddim_timesteps(1000, 4).tolist()


def test_w_conditioned_student_starts_at_the_teacher(tiny_teacher_dir):
    teacher = load_teacher(str(tiny_teacher_dir), "cpu")
    student = w_conditioned_unet(teacher.unet, 32)
    z, t = torch.randn(3, 4, 16, 16), torch.tensor([10, 500, 990])
    cond = teacher.encode_prompts(["a red cube", "a blue torus", "a green cone, back view"])
    with torch.no_grad():
        plain = teacher.unet(z, t, encoder_hidden_states=cond).sample
        for w in (1.0, 7.5):
            emb = guidance_embedding(torch.full((3,), w), 32)
            assert torch.equal(student(z, t, encoder_hidden_states=cond, timestep_cond=emb).sample, plain)
        torch.nn.init.normal_(student.time_embedding.cond_proj.weight, std=0.1)  # once trained, w matters
        a = student(z, t, encoder_hidden_states=cond, timestep_cond=guidance_embedding(torch.full((3,), 1.0), 32)).sample
        b = student(z, t, encoder_hidden_states=cond, timestep_cond=guidance_embedding(torch.full((3,), 7.5), 32)).sample
    assert (a - b).abs().max() > 1e-4


def test_stochastic_renoise_step_has_the_right_marginal_variance():
    alphas = _alphas()
    torch.manual_seed(0)
    s2 = 0.25  # data ~ N(0, s2)
    x = torch.randn(400_000, 1, 1, 1) * s2 ** 0.5
    for t_skip, t_to in ((499, 749), (-1, 249)):
        ab_skip = alphas[t_skip] if t_skip >= 0 else torch.tensor(1.0)
        z = ab_skip.sqrt() * x + (1 - ab_skip).sqrt() * torch.randn_like(x)  # exact marginal at t_skip
        out = renoise_step(alphas, z, t_skip, t_to, torch.randn_like(x))
        expected = alphas[t_to] * s2 + 1 - alphas[t_to]
        assert abs(float(out.var()) - float(expected)) < 0.01 * float(expected)


def test_w_conditioned_sampling_is_one_pass_per_step(tiny_teacher_dir, tmp_path):
    cfg = load_distill_config("guided", overrides=[*SMALL, f"teacher={tiny_teacher_dir}"])
    distill(cfg, tmp_path / "run", show_progress=False, evaluate=False)
    model = load_teacher(str(tmp_path / "run" / "phases" / "guided_w"), "cpu")
    batches = []
    hook = model.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    sample_latents(model, ["a red cube", "a blue torus"], steps=4, guidance_scale=5.0, sampler="stochastic",
                   generator=torch.Generator().manual_seed(0))
    hook.remove()
    assert batches == [2, 2, 2, 2]  # no CFG doubling: w is an input
    result = run_cli("sample", "a red cube", "--model", str(tmp_path / "run" / "student"), "-n", "1", "--out",
                     str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "s" / "prompts.json").read_text())
    assert record["timesteps"] == [999] and record["guidance_scale"] == 4.5


def test_pd_resume_after_a_crash_matches_an_uninterrupted_run(tiny_teacher_dir, tmp_path):
    cfg = load_distill_config("pd", overrides=[*SMALL, f"teacher={tiny_teacher_dir}", "trajectory.round_steps=3"])
    distill(cfg, tmp_path / "full", show_progress=False, evaluate=False)

    class Kill(Exception):
        pass

    crashed = TrajectoryTrainer(cfg, tmp_path / "crashed", show_progress=False)
    (tmp_path / "crashed" / "checkpoints").mkdir(parents=True)
    real_step, calls = crashed.train_step, []

    def dying_step():
        calls.append(1)
        if len(calls) == 5:  # in the second round, after its first checkpointed step
            raise Kill
        return real_step()

    crashed.train_step = dying_step
    with pytest.raises(Kill):
        crashed.fit()
    resumed = TrajectoryTrainer(cfg, tmp_path / "crashed", show_progress=False)
    resumed.load()
    assert resumed.phase_index == 1 and resumed.step == 1
    resumed.fit()
    for name in ("pd_2", "pd_1"):
        a = load_teacher(str(tmp_path / "full" / "phases" / name), "cpu").unet.state_dict()
        b = load_teacher(str(tmp_path / "crashed" / "phases" / name), "cpu").unet.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_cli_kd_and_pd_short_runs_are_scored(tiny_teacher_dir, tmp_path):
    for method in ("kd", "pd"):
        out = tmp_path / method
        result = run_cli("distill2d", "--method", method, "--teacher", str(tiny_teacher_dir), "--steps", "2",
                         "--out", str(out), "-q", *SMALL)
        assert result.returncode == 0, result.stderr
        assert "judge on 432" in result.stdout and (out / "student" / "student.json").is_file()


def test_steps_is_the_total_split_over_the_phases():
    unset = plan(load_distill_config("guided", overrides=["trajectory.start_steps=4"]))
    assert [p.steps for p in unset] == [300, 150, 150]  # without steps: the phases' own counts
    for method, final in (("pd", "pd_1"), ("guided", "guided_pd_1")):
        for steps in (1, 2, 3, 7, 1000):
            phases = plan(load_distill_config(method, overrides=[f"steps={steps}"]))
            assert sum(p.steps for p in phases) == steps and all(p.steps > 0 for p in phases), (method, steps)
            if method == "pd" or steps > 1:
                assert phases[-1].name == final  # the run still ends with the one-step student
            if method == "guided":
                assert phases[0].name == "guided_w"  # and guided's w-conditioned stage 1 always runs
    # in proportion: guided's stage 1 is 300 of 1200 updates, each of the 6 rounds 150
    assert [p.steps for p in plan(load_distill_config("guided", overrides=["steps=120"]))] == [30] + [15] * 6
    explicit = ["trajectory.start_steps=4", "trajectory.round_steps=2", "trajectory.stage1_steps=2"]
    assert [p.steps for p in plan(load_distill_config("guided", overrides=[*explicit, "steps=6"]))] == [2, 2, 2]


@pytest.mark.parametrize("method", ["pd", "guided"])
def test_cli_steps_bounds_the_student_updates(tiny_teacher_dir, tmp_path, method):
    out = tmp_path / method
    result = run_cli("distill2d", "--method", method, "--teacher", str(tiny_teacher_dir), "--steps", "3",
                     "--out", str(out), "-q", "--no-eval", *SMALL)  # SMALL's rounds alone would be 4 or 6 updates
    assert result.returncode == 0, result.stderr
    updates = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]  # log_every=1
    assert len(updates) == 3 and "done: 3 steps" in result.stdout
    assert (out / "student" / "student.json").is_file()


def test_cli_kd_short_run_makes_a_few_pairs_and_says_so(tiny_teacher_dir, tmp_path):
    out = tmp_path / "kd"
    small = [o for o in SMALL if not o.startswith("regression.pairs=")]  # the pairs' count left to the run
    result = run_cli("distill2d", "--method", "kd", "--teacher", str(tiny_teacher_dir), "--steps", "3",
                     "--out", str(out), "--no-eval", *small, env_update={"TEXT3D_PROGRESS_INTERVAL": "0.1"})
    assert result.returncode == 0, result.stderr
    cache = out / "cache" / "kd_pairs.pt"
    assert "making 32 regression pairs for the kd student's training data" in result.stderr
    assert str(cache) in result.stderr and "[regression pairs] step 32/32" in result.stderr
    assert len(torch.load(cache, weights_only=False)["latents"]) == 32  # batch_size 2 x 3 steps, at least 32
    assert "pairs: 32" in (out / "config.yaml").read_text()
