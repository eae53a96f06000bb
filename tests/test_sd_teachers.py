"""Stable-Diffusion-sized teachers: the published shapes (counted on the meta device), CLIP's BPE tokenizer, the
same builder at tiny widths through the real code paths at 512 px (v-prediction included), hub ids loaded from
a local Hugging Face cache offline, `text3d doctor --teacher` and `scripts/gpu_check.py` on the CPU."""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from text3d.errors import TeacherError, UserError
from text3d.teacher import load_teacher
from text3d.teacher.sd_shapes import (CLIP_VOCAB_SIZE, SD_SHAPES, build_sd_teacher, clip_bpe_vocab, find_clip_bpe,
                                      parameter_counts, read_clip_merges, write_clip_bpe_tokenizer)

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _has_clip_bpe() -> bool:
    try:
        find_clip_bpe()
        return True
    except UserError:
        return False


# ------------------------------------------------------------------ the published shapes
@pytest.mark.parametrize("shape, unet, text", [("sd15", 859.52, 123.06), ("sd21-base", 865.91, 340.39),
                                               ("sd21", 865.91, 340.39)])
def test_full_shapes_have_the_published_parameter_counts(shape, unet, text):
    counts = parameter_counts(shape)  # meta device: no memory, instant
    assert round(counts["unet"] / 1e6, 2) == unet
    assert round(counts["text_encoder"] / 1e6, 2) == text
    assert round(counts["vae"] / 1e6, 2) == 83.65


def test_shape_settings():
    assert SD_SHAPES["sd15"].prediction_type == "epsilon" and SD_SHAPES["sd21-base"].prediction_type == "epsilon"
    assert SD_SHAPES["sd21"].prediction_type == "v_prediction" and SD_SHAPES["sd21"].sample_size == 96
    for name in ("sd21", "sd21-base"):
        s = SD_SHAPES[name]
        assert s.heads == [5, 10, 20, 20] and s.linear_projection and s.text_layers == 23 and s.text_hidden == 1024
        assert s.text_act == "gelu" and s.text_heads == 16 and s.text_mlp == 4096 and s.pad_token == "!"
    assert SD_SHAPES["sd15"].text_layers == 12 and SD_SHAPES["sd15"].text_act == "quick_gelu"


# ------------------------------------------------------------------ CLIP's BPE tokenizer
def test_bpe_vocab_layout_on_a_small_merges_file(tmp_path):
    merges = ["#version: 0.2", "c a", "ca t</w>", "p h", "ph o", "t o</w>", "pho to</w>", "not used"]
    path = tmp_path / "bpe.txt.gz"
    path.write_bytes(gzip.compress("\n".join(merges).encode()))
    read = read_clip_merges(path, n_merges=6)
    assert read[0] == ("c", "a") and read[-1] == ("pho", "to</w>") and len(read) == 6
    vocab = clip_bpe_vocab(read)
    assert vocab["!"] == 0 and vocab["a"] == 64 and vocab["a</w>"] == 320  # CLIP's byte order: printable first
    assert vocab["cat</w>"] == 513 and vocab["photo</w>"] == 517 and vocab["<|endoftext|>"] == 519
    write_clip_bpe_tokenizer(tmp_path / "tok", path, n_merges=6)
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tok("a cat photo")["input_ids"] == [518, 320, 513, 517, 519]


@pytest.mark.skipif(not _has_clip_bpe(), reason="CLIP's merges file is not installed (pip install --no-deps "
                                                "open_clip_torch)")
def test_real_clip_bpe_gives_clips_token_ids(tmp_path):
    from transformers import CLIPTokenizer

    write_clip_bpe_tokenizer(tmp_path / "tok", find_clip_bpe(), pad_token="!")
    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(tok) == CLIP_VOCAB_SIZE
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 0  # SD 2 pads with "!"


def test_missing_bpe_file_is_one_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        find_clip_bpe(tmp_path / "nope.txt.gz")


# ------------------------------------------------------------------ the builder at tiny widths
@pytest.fixture(scope="module")
def tiny_sd21(tmp_path_factory) -> Path:
    return build_sd_teacher(tmp_path_factory.mktemp("sd") / "sd21", "sd21", width="tiny", seed=0,
                            tokenizer_words=["a", "corgi", "photo", "of"])


def test_tiny_sd21_loads_with_the_real_features(tiny_sd21):
    teacher = load_teacher(tiny_sd21, "cpu")
    assert teacher.prediction_type == "v_prediction" and teacher.image_size == 768 and teacher.latent_size == 96
    assert teacher.unet.config.use_linear_projection and list(teacher.unet.config.attention_head_dim) == [5, 10, 20, 20]
    assert teacher.text_encoder.config.hidden_act == "gelu" and teacher.vae_scale_factor == 8
    card = json.loads((tiny_sd21 / "text3d_shape.json").read_text())
    assert card["shape"] == "sd21" and card["width"] == "tiny"
    # a 64 px render is resized to the teacher's 768 px input and encoded to 96x96 latents
    latents = teacher.encode_images(torch.rand(1, 3, 64, 64))
    assert latents.shape == (1, 4, 96, 96)


def test_tiny_sd21_sds_and_vsd_steps_at_full_resolution(tiny_sd21):
    from text3d.guidance.sds import SDSConfig, SDSGuidance
    from text3d.guidance.vsd import VSDConfig, VSDGuidance

    teacher = load_teacher(tiny_sd21, "cpu")
    render = torch.rand(1, 3, 64, 64, requires_grad=True)
    out = SDSGuidance(teacher, SDSConfig(guidance_scale=100.0))(render, ["a corgi"])
    out.loss.backward()
    assert out.grad.shape == (1, 4, 96, 96) and render.grad is not None and render.grad.abs().sum() > 0
    vsd = VSDGuidance(teacher, VSDConfig())
    before = {k: v.clone() for k, v in vsd.lora.lora_state_dict().items()}
    g = vsd(torch.rand(1, 3, 64, 64), ["a corgi"])
    stats = vsd.update(g, ["a corgi"])
    assert torch.isfinite(torch.tensor(stats["lora_loss"]))
    after = vsd.lora.lora_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)  # the LoRA learnt
    # LoRA on every attention projection of the real blocks, self- and cross-attention alike
    names = [n for n, _ in teacher.unet.named_modules() if n.endswith("attn2.to_k")]
    assert names and all(hasattr(teacher.unet.get_submodule(n), "lora_A") for n in names)


def test_builder_errors(tmp_path):
    with pytest.raises(UserError, match="unknown Stable Diffusion shape"):
        build_sd_teacher(tmp_path / "x", "sd3")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        build_sd_teacher(tmp_path / "full", "sd15", width="tiny", tokenizer_words=["a"])


# ------------------------------------------------------------------ hub ids from the local cache, offline
def _lay_out_as_hub_cache(folder: Path, hf_home: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return repo


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network call attempted: {args[:1]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("offline", [True, False])
def test_hub_id_loads_from_the_local_cache_without_network(tiny_teacher_dir, tmp_path, monkeypatch, no_network,
                                                           offline):
    hf_home = tmp_path / "hf"
    _lay_out_as_hub_cache(tiny_teacher_dir, hf_home, "text3d-tests/tiny-sd")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    teacher = load_teacher("text3d-tests/tiny-sd", "cpu")
    reference = load_teacher(tiny_teacher_dir, "cpu")
    assert teacher.source == "text3d-tests/tiny-sd"
    x = torch.randn(1, 4, 16, 16)
    emb = teacher.encode_prompts(["a red cube"])
    assert torch.equal(emb, reference.encode_prompts(["a red cube"]))
    assert torch.equal(teacher.unet_output(x, torch.tensor([500]), emb), reference.unet_output(x, torch.tensor([500]), emb))


def test_hub_id_missing_from_the_cache_names_the_folder(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherError) as excinfo:
        load_teacher("stabilityai/stable-diffusion-2-1-base", "cpu")
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert str(tmp_path / "hf" / "hub" / "models--stabilityai--stable-diffusion-2-1-base") in msg


# ------------------------------------------------------------------ text3d doctor --teacher, gpu_check on the CPU
def test_doctor_describes_a_teacher_and_estimates_memory(tiny_sd21):
    from tests.helpers import run_cli

    result = run_cli("doctor", "--teacher", str(tiny_sd21), "--device", "cpu", timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "768 px images, 4x96x96 latents" in out and "v_prediction" in out and "float32" in out
    assert "generate --guidance sds" in out and "distill2d (lean mode" in out  # 768 px on the CPU: lean
    from text3d.teacher.memory import estimate_peak, inspect_teacher

    info = inspect_teacher(str(tiny_sd21))
    counts = parameter_counts("sd21", width="tiny")
    # from the safetensors headers, equal to the networks' own counts (the text encoder's vocabulary is the
    # word-list tokenizer's here, not CLIP's 49408)
    assert info.params["unet"] == counts["unet"] and info.params["vae"] == counts["vae"]
    assert 0 < info.params["text_encoder"] < counts["text_encoder"]
    sds, vsd = estimate_peak(info, "sds"), estimate_peak(info, "vsd")
    lean = estimate_peak(info, "sds", lean=True)
    assert vsd["total"] >= sds["total"] > lean["total"] > info.weight_bytes
    adamw = estimate_peak(info, "distill2d", optimizer="adamw")["total"]
    assert estimate_peak(info, "distill2d", optimizer="adafactor")["total"] < adamw


def test_doctor_with_a_missing_teacher_is_one_line(tmp_path):
    from tests.helpers import run_cli

    result = run_cli("doctor", "--teacher", str(tmp_path / "nope"), timeout=120)
    assert result.returncode != 0 and "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine gpu_check runs its rows for real")
def test_gpu_check_reports_every_row_skipped_on_the_cpu():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:] if line.strip()]
    assert [r[0] for r in rows] == ["nerfacc", "tcnn", "nvdiffrast", "fp16", "sd-sds", "sd-vsd"]
    assert all(r[1] == "skipped" for r in rows)
    assert all("no CUDA device" in line for line in result.stdout.splitlines()[2:] if line.strip())


# ------------------------------------------------------------------ VSD with the LoRA fused into the guidance call
@pytest.mark.parametrize("space", ["latent", "image"])
def test_fused_vsd_matches_the_unfused_gradient_and_trains_the_lora(tiny_teacher_dir, space):
    from text3d.guidance.vsd import VSDConfig, VSDGuidance

    grads, losses, changed = {}, {}, {}
    for fused in (False, True):
        teacher = load_teacher(tiny_teacher_dir, "cpu")
        torch.manual_seed(0)
        cfg = VSDConfig(fused_lora=fused, space=space)
        cfg.lora.camera_drop = 0.0
        vsd = VSDGuidance(teacher, cfg)
        x = torch.randn(2, 4, 16, 16)
        t, noise = torch.tensor([300, 700]), torch.randn(2, 4, 16, 16)
        cond = teacher.encode_prompts(["a red cube"] * 2)
        uncond = teacher.encode_prompts([""] * 2)
        condition = torch.randn(2, 16)
        with torch.no_grad():  # the LoRA's loss at this draw
            expected = float(vsd.lora.denoising_loss(x, cond, t, noise, condition))
        before = {k: v.clone() for k, v in vsd.lora.lora_state_dict().items()}
        image = teacher.decode_latents(x) if space == "image" else None
        out = vsd.guide(x, cond, uncond, condition=condition, t=t, noise=noise, image=image)
        grads[fused] = out.grad
        after = vsd.lora.lora_state_dict()
        changed[fused] = any(not torch.equal(before[k], after[k]) for k in before)
        stats = vsd.update(out, ["a red cube"] * 2)
        losses[fused] = (stats["lora_loss"], expected)
    assert torch.allclose(grads[True], grads[False], atol=1e-6)  # the prediction is made before the LoRA's step
    assert changed[True] and not changed[False]  # fused: the LoRA already stepped inside guide()
    assert losses[True][0] == pytest.approx(losses[True][1], rel=1e-5)  # its loss is the loss at the guidance draw


# ------------------------------------------------------------------ distill2d's memory-lean mode
def test_distill2d_lean_mode_changes_what_it_says(tiny_teacher_dir, tmp_path):
    from text3d.distill2d.config import apply_lean, lean_wanted, load_distill_config
    from text3d.distill2d.trainer import Distill2DTrainer

    cfg = load_distill_config("dmd2")
    assert lean_wanted(cfg, "cpu", 512) and not lean_wanted(cfg, "cuda", 512) and not lean_wanted(cfg, "cpu", 64)
    cfg.lean = "off"
    assert not lean_wanted(cfg, "cpu", 512)
    cfg.lean = "on"
    assert lean_wanted(cfg, "cuda", 64)
    assert sorted(apply_lean(cfg)) == ["batch_size=1", "gradient_checkpointing=True", "optimizer=adafactor",
                                       "real_images=8"]
    assert apply_lean(cfg) == []  # idempotent: a resumed run's saved config stays as it is
    # on the tiny teacher with lean=on: one DMD2 iteration with an Adafactor student, the VAE one image at a time
    cfg = load_distill_config("dmd2", overrides=["batch_size=2", "real_images=8", "sample_every=1000",
                                                 f"teacher={tiny_teacher_dir}", "fake.steps=1", "lean=on"])
    with pytest.warns(UserWarning, match="memory-lean mode"):
        trainer = Distill2DTrainer(cfg, tmp_path, show_progress=False)
    assert trainer.lean and cfg.batch_size == 1 and isinstance(trainer.optimizer.optimizer, torch.optim.Adafactor)
    assert trainer.teacher.memory_lean and trainer.teacher.vae.use_slicing
    before = [p.detach().clone() for p in trainer.student.unet.parameters()]
    trainer.train_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.student.unet.parameters()))
    trainer.fake.remove()


def test_teacher_memory_modes(tiny_sd21, tiny_teacher_dir):
    from text3d.errors import ConfigError
    from text3d.teacher import TeacherConfig

    auto = load_teacher(tiny_sd21, "cpu")  # 768 px on the CPU: the VAE one image at a time
    assert auto.memory_lean and auto.vae.use_slicing and not auto.vae.encoder.gradient_checkpointing
    assert not load_teacher(tiny_teacher_dir, "cpu").memory_lean  # 64 px: untouched
    lean = load_teacher(TeacherConfig(name_or_path=str(tiny_sd21), memory="lean"), "cpu")
    assert lean.vae.encoder.gradient_checkpointing
    image = torch.rand(2, 3, 64, 64, requires_grad=True)
    lean.encode_images(image).sum().backward()  # checkpointed encoder, sliced batch: the gradient still arrives
    image_ref = image.detach().clone().requires_grad_(True)
    normal = load_teacher(TeacherConfig(name_or_path=str(tiny_sd21), memory="normal"), "cpu")
    normal.encode_images(image_ref).sum().backward()
    assert torch.allclose(image.grad, image_ref.grad, atol=1e-5)  # the same numbers, less memory
    with pytest.warns(UserWarning, match="fp16 on the CPU"):
        assert load_teacher(TeacherConfig(name_or_path=str(tiny_teacher_dir), dtype="fp16"), "cpu").dtype == torch.float32
    with pytest.raises(ConfigError, match="teacher.memory"):
        load_teacher(TeacherConfig(name_or_path=str(tiny_teacher_dir), memory="tiny"), "cpu")


def test_shipped_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    from text3d.errors import ConfigError
    from text3d.generate.config import load_config

    monkeypatch.chdir(tmp_path)
    for name in ("configs/vsd-sd21.yaml", "vsd-sd21.yaml"):
        cfg = load_config(files=[name])
        assert cfg.guidance == "vsd" and cfg.teacher.dtype == "fp16" and cfg.train.high_resolution == 256
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "vsd-sd21.yaml").write_text("train:\n  steps: 7\n")
    assert load_config(files=["configs/vsd-sd21.yaml"]).train.steps == 7  # a file on disk comes first
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(files=["configs/no-such.yaml"])
