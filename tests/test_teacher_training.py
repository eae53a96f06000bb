"""Training of the embedded teacher: save and reload through the SD loading path, VAE learning,
exact resume after Ctrl-C, time budget, the world's tokenizer, the script's guard rails."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from text3d.errors import UserError
from text3d.teacher_training import Architecture, Interrupted, TeacherTrainConfig
from text3d.teacher_training.data import (BatchOrder, caption_pieces, load_dataset, world_vocabulary,
                                       write_fake_dataset)
from text3d.teacher_training.export import JUDGE_BEGIN, JUDGE_END, fill_model_card_section
from text3d.teacher_training.run import train_teacher
from text3d.runtime.signals import StopRequest
from text3d.teacher_training.stages import VAEStage

# a few thousand times smaller than the shipped teacher: the same classes and data flow
TINY = Architecture(vae_channels=(16, 32, 32), vae_norm_groups=8, unet_channels=(16, 32, 32), unet_heads=2,
                    unet_norm_groups=8, text_width=32, text_layers=2, text_heads=2, text_length=16)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory) -> Path:
    return write_fake_dataset(tmp_path_factory.mktemp("fake") / "data", n=24, seed=3)


def tiny_config(tmp: Path, **kw) -> TeacherTrainConfig:
    base = dict(out=str(tmp / "teacher"), work=str(tmp / "work"), vae_steps=4, unet_steps=4, vae_batch_size=4,
                batch_size=4, warmup_steps=2, checkpoint_every=2, threads=1, benchmark_steps=0, preview=False,
                progress=False, device="cpu", arch=TINY, seed=5)
    base.update(kw)
    return TeacherTrainConfig(**base)


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def trained(fake_data, tmp_path_factory):
    """One uninterrupted tiny run: (config, summary)."""
    tmp = tmp_path_factory.mktemp("run_a")
    cfg = tiny_config(tmp)
    info = train_teacher(cfg, load_dataset(fake_data), data_path=fake_data, log=quiet)
    return cfg, info


def test_trained_teacher_reloads_through_the_sd_loader(trained):
    from text3d.teacher import load_teacher

    cfg, info = trained
    out = Path(cfg.out)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json", "README.md"):
        assert (out / part).exists(), part
    teacher = load_teacher(out, "cpu")
    assert teacher.prediction_type == "epsilon" and teacher.num_train_timesteps == 1000
    assert teacher.image_size == 64 and teacher.latent_size == 16 and teacher.latent_channels == 4
    assert teacher.scaling_factor == pytest.approx(info["results"]["scaling_factor"])
    assert teacher.max_text_length == TINY.text_length
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        latents = teacher.encode_images(images)
        assert latents.shape == (2, 4, 16, 16)
        # the scaling factor makes the dataset's latents unit-variance
        data = load_dataset(info["dataset"]["path"])
        assert float(teacher.encode_images(data.images()).std()) == pytest.approx(1.0, rel=1e-3)
        cond = teacher.encode_prompts(["a red square, front view", "a blue circle"])
        uncond = teacher.encode_prompts(["", ""])
        assert cond.shape == (2, TINY.text_length, TINY.text_width)
        eps = teacher.predict_eps(teacher.add_noise(latents, torch.randn_like(latents), torch.tensor([10, 900])),
                                  torch.tensor([10, 900]), cond, uncond, guidance_scale=5.0)
        assert eps.shape == (2, 4, 16, 16) and torch.isfinite(eps).all()
        decoded = teacher.decode_latents(latents)
        assert decoded.shape == (2, 3, 64, 64) and 0 <= float(decoded.min()) <= float(decoded.max()) <= 1


def test_model_card_and_judge_section(trained):
    cfg, info = trained
    card = Path(cfg.out) / "README.md"
    text = card.read_text()
    for needle in ("24 images", "AutoencoderKL", "UNet2DConditionModel", "CLIPTextModel", "scaling factor",
                   "4/4 steps", "Final losses", "## Reproduce", "## Judge scores", JUDGE_BEGIN, JUDGE_END):
        assert needle in text, needle
    fill_model_card_section(card, "| judge | score |\n|---|---|\n| colour accuracy | 0.9 |")
    new = card.read_text()
    assert "colour accuracy | 0.9" in new and "Not evaluated yet" not in new
    assert new.split(JUDGE_BEGIN)[0] == text.split(JUDGE_BEGIN)[0]


def test_vae_loss_decreases_on_a_fixed_batch(fake_data):
    data = load_dataset(fake_data)
    cfg = TeacherTrainConfig(vae_steps=30, vae_batch_size=4, vae_lr=2e-3, warmup_steps=1, progress=False, arch=TINY)
    from text3d.teacher_training.models import build_vae

    torch.manual_seed(0)
    stage = VAEStage(cfg, torch.device("cpu"), build_vae(TINY), data.arrays["images"][:4])  # n = batch: fixed batch
    losses = [stage.train_step()["loss"] for _ in range(30)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.6 * losses[0], losses


def _stop_at(stop: StopRequest, stage_name: str, step: int):
    def callback(stage, stats):
        if stage.name == stage_name and stage.step == step:
            stop.signal = "SIGINT"  # what the Ctrl-C handler does
    return callback


def test_resume_after_interrupts_matches_an_uninterrupted_run(trained, fake_data, tmp_path):
    cfg_a, _ = trained
    data = load_dataset(fake_data)
    cfg = tiny_config(tmp_path)
    for stage_name, step in (("vae", 1), ("unet", 3)):
        stop = StopRequest()
        with pytest.raises(Interrupted) as excinfo:
            train_teacher(cfg, data, data_path=fake_data, log=quiet, stop=stop, on_step=_stop_at(stop, stage_name, step))
        assert excinfo.value.exit_code == 130 and "--resume" in str(excinfo.value)
        state = torch.load(tmp_path / "work" / f"{stage_name}.pt", weights_only=True)
        assert state["step"] == step
        cfg = replace(cfg, resume=True)
    train_teacher(cfg, data, data_path=fake_data, log=quiet)

    for name in ("vae.pt", "unet.pt"):
        a = torch.load(Path(cfg_a.work) / name, weights_only=True)
        b = torch.load(tmp_path / "work" / name, weights_only=True)
        assert a["step"] == b["step"] == 4
        for key in ("vae", "unet", "text_encoder"):
            if key in a:
                assert a[key].keys() == b[key].keys()
                for k in a[key]:
                    assert torch.equal(a[key][k], b[key][k]), (name, key, k)
        if name == "unet.pt":
            for k, v in a["ema_unet"]["shadow"].items():
                assert torch.equal(v, b["ema_unet"]["shadow"][k]), k
        assert torch.equal(a["generator"], b["generator"])
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (Path(cfg_a.out) / part).read_bytes() == (tmp_path / "teacher" / part).read_bytes(), part


def test_time_budget_stops_early_and_still_writes_the_teacher(fake_data, tmp_path):
    from text3d.teacher import load_teacher

    cfg = tiny_config(tmp_path, vae_steps=1000, unet_steps=1000, time_budget_min=0.001)
    info = train_teacher(cfg, load_dataset(fake_data), data_path=fake_data, log=quiet)
    r = info["results"]
    assert 1 <= r["vae_steps_run"] < 1000 and 1 <= r["unet_steps_run"] < 1000 and r["stopped_early"]
    assert load_teacher(tmp_path / "teacher", "cpu").latent_size == 16
    assert "stopped early" in (tmp_path / "teacher" / "README.md").read_text()
    state = torch.load(tmp_path / "work" / "unet.pt", weights_only=True)
    assert state["step"] == r["unet_steps_run"]


def test_tokenizer_keeps_every_caption_word_whole(fake_data, tmp_path, monkeypatch):
    from text3d.teacher.tokenizer import build_clip_tokenizer, split_pieces

    from text3d.toyworld import catalog

    monkeypatch.setattr(catalog, "vocabulary", lambda: ["teapot", "overhead", "wooden"])
    captions = [str(c) for c in load_dataset(fake_data).arrays["captions"]]
    words = world_vocabulary(captions)
    assert {"teapot", "wooden", "red", "square", "view", ","} <= set(words)
    tokenizer = build_clip_tokenizer(tmp_path / "tok", words, model_max_length=16)
    for caption in set(captions) | {"a wooden teapot, overhead view"}:
        pieces = split_pieces(caption)
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(pieces), (caption, tokenizer.convert_ids_to_tokens(ids))
    monkeypatch.setattr(catalog, "vocabulary", lambda: [])
    assert set(world_vocabulary(captions)) == caption_pieces(captions)  # words the catalog lacks still kept


def test_batch_order_is_a_pure_function_of_the_step():
    order = BatchOrder(10, 4, seed=1)
    seen = torch.cat([order.indices(s) for s in (1, 2, 3, 4, 5)])  # 20 draws = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(BatchOrder(10, 4, seed=1).indices(3), order.indices(3))


def test_guard_rails(fake_data, tmp_path, trained):
    data = load_dataset(fake_data)
    cfg_a, _ = trained
    # a work folder with checkpoints needs --resume or --fresh
    with pytest.raises(UserError, match="--resume"):
        train_teacher(replace(cfg_a, out=str(tmp_path / "t")), data, log=quiet)
    # never replace a folder that is not a teacher
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a teacher folder"):
        train_teacher(tiny_config(tmp_path, out=str(tmp_path / "notes")), data, log=quiet)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="not a toyworld dataset"):
        load_dataset(tmp_path / "nothing")


def _train(*args: str) -> int:
    """`text3d teacher train ARGS` in this process: 0, or the exit code of the error."""
    from text3d.cli import main

    try:
        return main(["teacher", "train", *map(str, args)])
    except SystemExit as exc:
        return exc.code


def test_command_exit_codes(monkeypatch, fake_data, tmp_path, capsys):
    def interrupted(*args, **kwargs):
        raise Interrupted("stopped by SIGINT")

    monkeypatch.setattr("text3d.teacher_training.run.train_teacher", interrupted)
    assert _train("--data", fake_data, "--work", tmp_path / "w", "--out", tmp_path / "o") == 130
    assert _train("--data", tmp_path / "missing", "--work", tmp_path / "w", "--out", tmp_path / "o") == 2
    assert _train("--data", fake_data, "--resume", "--fresh") == 2
    assert _train("--data", fake_data, "--vae-steps", "-1") == 2
    assert _train("--data", fake_data, "--work", tmp_path / "w") == 2  # no --out: never the installed teacher
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: stopped by SIGINT", f"error: {tmp_path / 'missing'} is not a toyworld dataset (no meta.json); "
                   "render one with --render N", "error: --resume and --fresh cannot be combined",
                   "error: --vae-steps must be >= 0, got -1",
                   "error: give --out DIR, the teacher folder to write (text3d/assets/teacher in a checkout replaces "
                   "the embedded teacher)"]
    seen = {}

    def finetune(cfg, dataset, init, **kwargs):
        seen.update(kwargs, command=cfg.command, out=cfg.out)
        raise Interrupted("stopped by SIGINT")

    monkeypatch.setattr("text3d.teacher_training.finetune.finetune_teacher", finetune)
    base = ["--data", fake_data, "--work", tmp_path / "w", "--out", tmp_path / "o", "--init", "t"]
    assert _train(*base, "--repeat-views", "front, back", "--replay", "3", "--no-progress") == 130
    assert seen["repeat_views"] == ["front", "back"] and seen["replay"] == 3 and seen["out"] == str(tmp_path / "o")
    # the recorded command: the options given, runnable as they are (a fake dataset gets no --render)
    assert seen["command"] == (f"text3d teacher train --data {fake_data} --out {tmp_path / 'o'} --work "
                               f"{tmp_path / 'w'} --no-progress --init t --repeat-views 'front, back' --replay 3")
    assert _train(*base, "--repeat-views", "front,top") == 2
    assert "unknown view label(s) top" in capsys.readouterr().err
    from text3d.teacher_training.cli import reproduce_command

    command = reproduce_command(["--data", "d"], {"n": 100, "seed": 4})
    assert command == "text3d teacher train --data d --render 100 --render-seed 4"
    # a render with a wider camera range (toyworld render --max-elevation) is its own command first
    command = reproduce_command(["--data", "d"], {"n": 100, "seed": 4, "elevation": [-10.0, 85.0]})
    assert command == ("text3d toyworld render --n 100 --out d --seed 4 --max-elevation 85 && "
                       "text3d teacher train --data d")
    command = reproduce_command(["--data", "d"], {"n": 100, "seed": 4, "radius": [1.8, 3.0]})
    assert command == ("text3d toyworld render --n 100 --out d --seed 4 --min-radius 1.8 && "
                       "text3d teacher train --data d")


def test_script_wraps_the_command(monkeypatch, fake_data, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import train_teacher as script
    finally:
        sys.path.pop(0)

    def interrupted(*args, **kwargs):
        raise Interrupted("stopped by SIGINT")

    monkeypatch.setattr("text3d.teacher_training.run.train_teacher", interrupted)
    with pytest.raises(SystemExit) as exc:
        script.main(["--data", str(fake_data), "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 130


def test_command_help_and_one_line_error(tmp_path):
    from tests.helpers import run_cli

    result = run_cli("teacher", "train", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for option in ("--data", "--render", "--init", "--view-repeat", "--repeat-views", "--replay", "--time-budget-min",
                   "--resume", "--fresh", "--no-preview", "--ema-decay"):
        assert option in result.stdout, option
    result = run_cli("teacher", "train", "--data", str(tmp_path / "nothing"), "--work", str(tmp_path / "w"),
                     "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'nothing'} is not a toyworld dataset (no meta.json); "
                                          "render one with --render N"]
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_render_option_renders_the_toyworld(tmp_path):
    folder = tmp_path / "data"
    data = load_dataset(folder, render=3, seed=2, progress=False)  # `--render 3 --render-seed 2`
    assert len(data) == 3 and data.meta["n"] == 3 and data.meta["seed"] == 2 and not data.meta.get("fake")
    assert data.arrays["images"].shape == (3, 64, 64, 3)
    from text3d.toyworld.generate import render_dataset

    again = render_dataset(tmp_path / "again", 3, seed=2, progress=False)  # what `text3d toyworld render` writes
    assert np.array_equal(load_dataset(again).arrays["images"], data.arrays["images"])


def test_fit_steps_to_budget_and_foreground_weights():
    from text3d.teacher_training.run import fit_steps_to_budget
    from text3d.teacher_training.stages import pixel_weights

    cfg = TeacherTrainConfig(vae_steps=1000, unet_steps=4000)
    projected = {"vae": 600.0, "unet": 2400.0, "encode": 10.0}
    fitted = fit_steps_to_budget(cfg, projected, 1500.0, None, {"step": 1000}, False, quiet)
    assert fitted.vae_steps == 500 and fitted.unet_steps == 1000 + 1500
    x = torch.ones(1, 3, 8, 8)
    x[..., 2:5, 2:5] = -0.5  # a dark square on a white background
    w = pixel_weights(x, 4.0)
    assert w.shape == (1, 1, 8, 8) and float(w.sum()) == 64 + 4 * 9 and float(w[0, 0, 3, 3]) == 5.0


# ------------------------------------------------------------------ fine-tune (--init)


def test_view_examples_are_repeated():
    from text3d.teacher_training.finetune import weighted_indices

    mask = np.array([False, True, False, True])
    order = weighted_indices(mask, 3)
    assert sorted(order.tolist()) == [0, 1, 1, 1, 2, 3, 3, 3]
    assert weighted_indices(mask, 1).tolist() == [0, 1, 2, 3]
    with pytest.raises(UserError):
        weighted_indices(mask, 0)
    from text3d.teacher_training.finetune import select_examples

    big = np.arange(20) % 4 == 1
    keep = select_examples(big, replay=3, seed=0)
    assert big[keep].sum() == 5 and (~big[keep]).sum() == 3 and (np.diff(keep) > 0).all()
    assert select_examples(big, None, 0).tolist() == list(range(20))


def test_finetune_writes_a_teacher_that_reloads_and_resumes_exactly(trained, fake_data, tmp_path):
    from text3d.teacher import load_teacher
    from text3d.teacher_training.finetune import finetune_teacher, view_example_mask

    cfg_a, _ = trained
    init = Path(cfg_a.out)
    data = load_dataset(fake_data)
    mask = view_example_mask(data)
    has_view = np.array([", " in str(c) for c in data.arrays["captions"]])
    assert mask.tolist() == has_view.tolist() and 0 < mask.sum() < len(mask)  # every fake shape shows its view
    captions = [str(c) for c in data.arrays["captions"]]
    label = next(c for c in captions if ", " in c).split(", ")[1].split()[0]  # one view label the data has
    only = view_example_mask(data, labels=[label])
    assert only.tolist() == [m and c.endswith(f", {label} view") for m, c in zip(mask, captions)]
    assert only.sum() < mask.sum() or len({c.split(", ")[1] for c in captions if ", " in c}) == 1

    def cfg(name, **kw):
        return tiny_config(tmp_path / name, unet_steps=4, lr=1e-3, **kw)

    info = finetune_teacher(cfg("a"), data, init, view_repeat=2, replay=2, log=quiet)
    assert info["results"]["steps_run"] == 4 and info["n_view"] == int(mask.sum())
    assert info["n"] == int(mask.sum()) + 2 and info["n_data"] == len(mask)
    # naming views repeats only those, but keeps every visible-view example (none goes to the replay pool)
    named = finetune_teacher(tiny_config(tmp_path / "d", unet_steps=1, lr=1e-3), data, init, view_repeat=2,
                             replay=0, log=quiet, repeat_views=[label])
    assert named["n"] == int(mask.sum()) and named["n_view"] == int(only.sum())
    assert named["view_share"] == pytest.approx(2 * only.sum() / (mask.sum() + only.sum()))
    out = tmp_path / "a" / "teacher"
    # the VAE and tokenizer are the init teacher's; the UNet moved
    assert (out / "vae/diffusion_pytorch_model.safetensors").read_bytes() == \
        (init / "vae/diffusion_pytorch_model.safetensors").read_bytes()
    assert (out / "unet/diffusion_pytorch_model.safetensors").read_bytes() != \
        (init / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    for part in ("unet", "vae"):  # no machine-specific path of the init teacher in the written configs
        assert "_name_or_path" not in json.loads((out / part / "config.json").read_text())
    teacher = load_teacher(out, "cpu")
    assert teacher.scaling_factor == pytest.approx(load_teacher(init, "cpu").scaling_factor)
    card = (out / "README.md").read_text()
    assert "## Fine-tune 1" in card and "4/4 steps" in card and "Not evaluated yet" in card
    assert card.index("## Fine-tune") < card.index("## Judge scores")
    from text3d.teacher_training.finetune import finetune_card

    again = finetune_card(card, info)  # a fine-tune of the fine-tune keeps the first section
    assert "## Fine-tune 1" in again and again.index("## Fine-tune 1") < again.index("## Fine-tune 2")

    # Ctrl-C at step 2, then --resume: the same weights as the uninterrupted run
    stop = StopRequest()
    with pytest.raises(Interrupted):
        finetune_teacher(cfg("b"), data, init, view_repeat=2, replay=2, log=quiet, stop=stop,
                         on_step=_stop_at(stop, "unet", 2))
    with pytest.raises(UserError, match="--resume"):
        finetune_teacher(cfg("b"), data, init, view_repeat=2, replay=2, log=quiet)
    with pytest.raises(UserError, match="view repeat"):
        finetune_teacher(cfg("b", resume=True), data, init, view_repeat=3, replay=2, log=quiet)
    every_label = sorted({c.split(", ")[1].split()[0] for c in captions if ", " in c})  # same examples, named views
    with pytest.raises(UserError, match=r"views all\); this run has .* \(views \["):
        finetune_teacher(cfg("b", resume=True), data, init, view_repeat=2, replay=2, log=quiet,
                         repeat_views=every_label)
    finetune_teacher(cfg("b", resume=True), data, init, view_repeat=2, replay=2, log=quiet)
    part = "unet/diffusion_pytorch_model.safetensors"
    assert (out / part).read_bytes() == (tmp_path / "b" / "teacher" / part).read_bytes()
    with pytest.raises(UserError, match="not a teacher folder"):
        finetune_teacher(cfg("c"), data, tmp_path / "nothing", log=quiet)
