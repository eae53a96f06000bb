"""DDIM sampling: exact recovery with a toy denoiser, timestep spacing, the tiny teacher, `text3d sample`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from text3d.errors import UserError
from text3d.teacher.sampling import ddim_step, ddim_timesteps, predict_x0, sample_images, sample_latents


pytestmark = pytest.mark.usefixtures("one_thread")


def sd_alphas_cumprod(T: int = 1000) -> torch.Tensor:
    """Stable Diffusion's scaled-linear schedule, computed here independently of diffusers."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


ALPHAS = sd_alphas_cumprod()


def exact_eps(x_t: torch.Tensor, x0: torch.Tensor, t) -> torch.Tensor:
    """The exact noise for a data distribution concentrated on x0: (x_t - sqrt(ab) x0) / sqrt(1 - ab)."""
    t = torch.as_tensor(t).reshape(-1)
    ab = ALPHAS[t.expand(x_t.shape[0]) if t.numel() == 1 else t].view(-1, 1, 1, 1)
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def _x0_and_noise(shape=(3, 4, 8, 8)):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g) * 0.7 + 0.3, torch.randn(shape, generator=g)


# ------------------------------------------------------------------ timesteps


def test_ddim_timesteps_trailing():
    assert ddim_timesteps(1000, 1).tolist() == [999]
    ts = ddim_timesteps(1000, 50)
    assert ts.dtype == torch.long and len(ts) == 50
    assert ts[:3].tolist() == [999, 979, 959] and ts[-1].item() == 19
    assert ddim_timesteps(1000, 4).tolist() == [999, 749, 499, 249]
    assert ddim_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))
    for steps in (2, 3, 7, 33, 333, 999):
        ts = ddim_timesteps(1000, steps)
        assert len(ts) == steps and ts[0] == 999 and bool((ts[:-1] > ts[1:]).all()), steps
        assert ts.min() >= 0


def test_ddim_timesteps_leading_and_errors():
    ts = ddim_timesteps(1000, 50, spacing="leading")
    assert ts[:2].tolist() == [981, 961] and ts[-1].item() == 1 and len(ts) == 50
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError):
            ddim_timesteps(1000, bad)
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 10, spacing="linear")


# ------------------------------------------------------------------ DDIM with a known denoiser


def test_one_step_recovers_x0_from_pure_noise():
    x0, noise = _x0_and_noise()
    t = ddim_timesteps(1000, 1).item()
    x_t = noise  # pure noise: DDIM starts from N(0, I) at t = T - 1
    x = ddim_step(ALPHAS, x_t, exact_eps(x_t, x0, t), t, -1)
    assert torch.allclose(x, x0, atol=1e-4)
    assert torch.allclose(predict_x0(ALPHAS, x_t, exact_eps(x_t, x0, t), t), x0, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_fifty_steps_recover_x0(eta):
    x0, noise = _x0_and_noise()
    ts = ddim_timesteps(1000, 50).tolist()
    x = noise
    g = torch.Generator().manual_seed(3)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x = ddim_step(ALPHAS, x, exact_eps(x, x0, t), t, t_prev, eta=eta, generator=g)
    assert torch.allclose(x, x0, atol=1e-4)


def test_deterministic_step_keeps_the_noise_and_lands_on_the_marginal():
    """With eta = 0, x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps for the same eps."""
    x0, eps = _x0_and_noise()
    t, t_prev = 700, 300
    x_t = ALPHAS[t].sqrt() * x0 + (1 - ALPHAS[t]).sqrt() * eps
    x_prev = ddim_step(ALPHAS, x_t, eps, t, t_prev)
    expected = ALPHAS[t_prev].sqrt() * x0 + (1 - ALPHAS[t_prev]).sqrt() * eps
    assert torch.allclose(x_prev, expected, atol=1e-5)
    # per-sample timesteps, one sample going all the way to x0
    tt, tp = torch.tensor([700, 700, 999]), torch.tensor([300, -1, 500])
    x_t = torch.cat([ALPHAS[i].sqrt() * x0[k:k + 1] + (1 - ALPHAS[i]).sqrt() * eps[k:k + 1]
                     for k, i in enumerate(tt.tolist())])
    x_prev = ddim_step(ALPHAS, x_t, eps, tt, tp)
    assert torch.allclose(x_prev[0], expected[0], atol=1e-5)
    assert torch.allclose(x_prev[1], x0[1], atol=1e-5)
    assert torch.allclose(x_prev[2], ALPHAS[500].sqrt() * x0[2] + (1 - ALPHAS[500]).sqrt() * eps[2], atol=1e-5)


def test_stochastic_step_adds_seeded_noise_of_the_right_size():
    x0, eps = _x0_and_noise((2000, 1, 1, 1))
    t, t_prev = 600, 400
    x_t = ALPHAS[t].sqrt() * x0 + (1 - ALPHAS[t]).sqrt() * eps
    a = ddim_step(ALPHAS, x_t, eps, t, t_prev, eta=1.0, generator=torch.Generator().manual_seed(5))
    b = ddim_step(ALPHAS, x_t, eps, t, t_prev, eta=1.0, generator=torch.Generator().manual_seed(5))
    det = ddim_step(ALPHAS, x_t, eps, t, t_prev, eta=0.0)
    assert torch.equal(a, b)
    ab, abp = ALPHAS[t].double(), ALPHAS[t_prev].double()
    sigma = float(((1 - abp) / (1 - ab)).sqrt() * (1 - ab / abp).sqrt())
    # a - det = sigma z + (sqrt(1 - abp - sigma^2) - sqrt(1 - abp)) eps
    shrink = float((1 - abp - sigma**2).sqrt() - (1 - abp).sqrt())
    z = (a - det - shrink * eps) / sigma
    assert abs(z.std().item() - 1.0) < 0.06 and abs(z.mean().item()) < 0.06


# ------------------------------------------------------------------ the tiny teacher


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    from text3d.teacher import load_teacher

    return load_teacher(tiny_teacher_dir, "cpu")


PROMPTS = ["a red cube", "a blue sphere, side view"]


def test_sample_latents_is_seed_deterministic(teacher):
    run = lambda seed: sample_latents(teacher, PROMPTS, steps=3, guidance_scale=5.0,  # noqa: E731
                                      generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, teacher.latent_channels, teacher.latent_size, teacher.latent_size)
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_cfg_scale_one_is_the_conditional_path(teacher):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, teacher.latent_channels, teacher.latent_size, teacher.latent_size, generator=g)
    steps = 3
    with torch.no_grad():  # the conditional-only DDIM loop, written out
        cond = teacher.encode_prompts(PROMPTS)
        ts = ddim_timesteps(teacher.num_train_timesteps, steps).tolist()
        x = noise.clone()
        for i, t in enumerate(ts):
            eps = teacher.predict_eps(x, t, cond)
            x = ddim_step(teacher, x, eps, t, ts[i + 1] if i + 1 < len(ts) else -1)
    one = sample_latents(teacher, PROMPTS, steps=steps, guidance_scale=1.0, latents=noise)
    assert torch.equal(one, x)
    # the batched [uncond, cond] path with scale 1 (a tensor, so predict_eps does not short-cut) agrees
    batched = sample_latents(teacher, PROMPTS, steps=steps, guidance_scale=torch.tensor(1.0), latents=noise)
    assert torch.allclose(batched, one, atol=1e-4, rtol=1e-4)
    # a negative prompt matters only with guidance
    assert torch.equal(sample_latents(teacher, PROMPTS, steps=steps, guidance_scale=1.0, latents=noise,
                                      negative="blurry"), one)
    guided = sample_latents(teacher, PROMPTS, steps=steps, guidance_scale=7.5, latents=noise)
    assert not torch.allclose(guided, one, atol=1e-3)
    with torch.no_grad():  # guidance is uncond + 7.5 (cond - uncond) with the empty prompt as uncond
        uncond = teacher.encode_prompts(["", ""])
        x = noise.clone()
        for i, t in enumerate(ts):
            eps_u, eps_c = teacher.predict_eps(x, t, uncond), teacher.predict_eps(x, t, cond)
            x = ddim_step(teacher, x, eps_u + 7.5 * (eps_c - eps_u), t, ts[i + 1] if i + 1 < len(ts) else -1)
    assert torch.allclose(guided, x, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(sample_latents(teacher, PROMPTS, steps=steps, guidance_scale=7.5, latents=noise,
                                             negative="blurry"), guided, atol=1e-4)


def test_one_step_sampling_and_images(teacher):
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, teacher.latent_channels, teacher.latent_size, teacher.latent_size, generator=g)
    z = sample_latents(teacher, "a red cube", steps=1, guidance_scale=3.0, latents=noise)
    with torch.no_grad():  # one step from t = T - 1 straight to the predicted x0
        eps = teacher.predict_eps(noise, teacher.num_train_timesteps - 1, teacher.encode_prompts(["a red cube"]),
                                  teacher.encode_prompts([""]), guidance_scale=3.0)
    ab = teacher.alphas_cumprod[-1]
    assert torch.allclose(z, (noise - (1 - ab).sqrt() * eps) / ab.sqrt(), atol=1e-4, rtol=1e-5)
    seen = []
    images = sample_images(teacher, ["a red cube"] * 2, steps=2, generator=torch.Generator().manual_seed(1),
                           callback=lambda i, t, x: seen.append((i, t)))
    assert images.shape == (2, 3, teacher.image_size, teacher.image_size)
    assert images.min() >= 0 and images.max() <= 1
    assert seen == [(0, 999), (1, 499)]
    with pytest.raises(ValueError):
        sample_latents(teacher, ["a", "b"], steps=2, latents=noise)


# ------------------------------------------------------------------ the sample command


@pytest.fixture(scope="module")
def cli():
    from text3d.distill2d.sample_cli import sample

    app = typer.Typer()
    app.command()(sample)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def _images(folder: Path) -> list[np.ndarray]:
    record = json.loads((folder / "prompts.json").read_text())
    return [np.asarray(Image.open(folder / r["file"])) for r in record["images"]]


def test_sample_command_writes_grid_images_and_record(cli, tiny_teacher_dir, tmp_path):
    out = tmp_path / "s"
    r = cli("a red cube", "--model", tiny_teacher_dir, "--steps", 2, "-n", 3, "--guidance-scale", 4, "--seed", 7,
            "--out", out, "--batch-size", 2, "--device", "cpu")
    assert r.exit_code == 0, r.output + repr(r.exception)
    record = json.loads((out / "prompts.json").read_text())
    assert [i["file"] for i in record["images"]] == [f"images/{i:05d}.png" for i in range(3)]
    assert {i["prompt"] for i in record["images"]} == {"a red cube"}
    assert record["steps"] == 2 and record["guidance_scale"] == 4.0 and record["seed"] == 7
    assert record["model"] == str(tiny_teacher_dir)
    images = _images(out)
    assert all(im.shape == (64, 64, 3) for im in images)
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * 64, 2 * 64, 3)  # 3 images in a 2x2 grid
    assert np.array_equal(grid[:64, :64], images[0]) and np.array_equal(grid[64:, :64], images[2])
    assert not list(out.glob(".*"))  # no temporary files left behind

    # same seed, different batch size: the same images; another seed: different ones
    again = tmp_path / "again"
    assert cli("a red cube", "--model", tiny_teacher_dir, "--steps", 2, "-n", 3, "--guidance-scale", 4, "--seed", 7,
               "--out", again, "--batch-size", 3, "--device", "cpu").exit_code == 0
    for a, b in zip(images, _images(again)):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    other = tmp_path / "other"
    assert cli("a red cube", "--model", tiny_teacher_dir, "--steps", 2, "-n", 3, "--guidance-scale", 4, "--seed", 8,
               "--out", other, "--device", "cpu").exit_code == 0
    assert not np.array_equal(images[0], _images(other)[0])

    # resampling into the same folder replaces the old entries (no stale images, no stale scores)
    (out / "scores.json").write_text("{}")
    (out / "mine.txt").write_text("keep me")
    assert cli("a red cube", "--model", tiny_teacher_dir, "--steps", 1, "-n", 1, "--out", out,
               "--device", "cpu").exit_code == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png"]
    assert not (out / "scores.json").exists() and (out / "mine.txt").read_text() == "keep me"


def test_sample_command_prompts_file(cli, tiny_teacher_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\n# a comment\n  a blue   sphere, side view  \n")
    out = tmp_path / "s"
    r = cli("--prompts", prompts, "--model", tiny_teacher_dir, "--steps", 1, "-n", 2, "--out", out,
            "--device", "cpu")
    assert r.exit_code == 0, r.output + repr(r.exception)
    record = json.loads((out / "prompts.json").read_text())
    assert [i["prompt"] for i in record["images"]] == ["a red cube"] * 2 + ["a blue sphere, side view"] * 2
    assert np.asarray(Image.open(out / "grid.png")).shape == (2 * 64, 2 * 64, 3)  # a row per prompt


@pytest.mark.parametrize("args", [["", "--out", "o"], ["   ", "--out", "o"], ["--out", "o"],
                                  ["a cube", "--prompts", "p.txt", "--out", "o"], ["--prompts", "p.txt", "--out", "o"],
                                  ["a cube", "--out", "o", "-n", "0"], ["a cube", "--out", "o", "--steps", "0"]])
def test_sample_command_refuses_bad_input(cli, tiny_teacher_dir, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    Path("p.txt").write_text("\n  \n")
    r = cli(*args, "--model", tiny_teacher_dir, "--device", "cpu")
    assert isinstance(r.exception, UserError), (r.output, r.exception)
    assert "\n" not in str(r.exception)
    assert not Path("o").exists() or not any(Path("o").iterdir())


def test_sample_command_without_a_teacher_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setattr("text3d.teacher.loader.DEFAULT_TEACHER_DIR", tmp_path / "no_teacher")
    r = cli("a red cube", "--out", tmp_path / "o", "--device", "cpu")
    assert isinstance(r.exception, UserError) and "\n" not in str(r.exception)


def test_grid_layout_rows_per_prompt_or_near_square():
    from text3d.distill2d.sample_cli import grid_columns

    assert grid_columns(4, 8) == 8  # one row per prompt
    assert grid_columns(1, 16) == 4  # one prompt: a square
    assert grid_columns(540, 1) == 24  # one image per prompt: wrapped, not a 540-high column
    assert grid_columns(3, 1) == 2


def test_ddim_inversion_recovers_a_constant_noise_and_calls_the_model_steps_times():
    """A model whose noise prediction is a constant c: every DDIM x0 estimate on the way up is x0 itself, so inverting
    x0 to t lands on sqrt(ab_t) x0 + sqrt(1 - ab_t) c, whatever the number of steps; the model sees timesteps rising
    from 0 and is called once per step."""
    from text3d.teacher.sampling import ddim_invert

    alphas = torch.linspace(0.9999, 0.01, 1000)
    x0, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([300, 900])
    for steps in (1, 3, 7):
        seen = []

        def eps_fn(x, s):
            seen.append(s.clone())
            return c

        x_t = ddim_invert(alphas, x0, eps_fn, t, steps)
        ab = alphas[t].view(-1, 1, 1, 1)
        assert torch.allclose((x_t - ab.sqrt() * x0) / (1 - ab).sqrt(), c, atol=1e-4)
        assert len(seen) == steps and seen[0].tolist() == [0, 0]
        assert all(bool((b > a).all()) for a, b in zip(seen, seen[1:]))
    # a model that depends on x: the inverted noise is not the constant any more, and one step is DDIM's own
    x_t = ddim_invert(alphas, x0, lambda x, s: 0.5 * x, t, 1)
    ab = alphas[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * 0.5 * x0, atol=1e-5)
    with pytest.raises(ValueError, match="steps >= 1"):
        ddim_invert(alphas, x0, eps_fn, t, 0)
