"""The teacher layer: CFG / parameterisation formulas, loading the tiny teacher, encode/decode, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from text3d.errors import TeacherError, UserError
from text3d.teacher import Teacher, TeacherConfig, apply_cfg, load_teacher, sample_to_eps, v_to_eps
from text3d.teacher.loader import is_local_path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir) -> Teacher:
    return load_teacher(tiny_teacher_dir, "cpu")


def _one_line_teacher_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, UserError)
    assert "\n" not in msg and 20 < len(msg) < 400, msg
    return msg


# ------------------------------------------------------------------ formulas


def test_apply_cfg_hand_computed():
    u = torch.tensor([1.0, 2.0, -3.0])
    c = torch.tensor([3.0, -1.0, 0.5])
    assert torch.allclose(apply_cfg(u, c, 2.0), torch.tensor([5.0, -4.0, 4.0]))
    assert torch.allclose(apply_cfg(u, c, 7.5), torch.tensor([16.0, -20.5, 23.25]))
    assert torch.equal(apply_cfg(u, c, 1.0), c)
    assert torch.equal(apply_cfg(u, c, 0.0), u)
    per_sample = apply_cfg(torch.zeros(2, 1), torch.ones(2, 1), torch.tensor([[2.0], [3.0]]))
    assert per_sample.flatten().tolist() == [2.0, 3.0]


def _noisy_pair():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    ab = torch.tensor([0.95, 0.5, 0.02]).view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    return x0, eps, ab, x_t


def test_v_to_eps_recovers_noise():
    x0, eps, ab, x_t = _noisy_pair()
    v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    assert torch.allclose(v_to_eps(v, x_t, ab), eps, atol=1e-5)
    assert not torch.allclose(v, eps, atol=1e-2)  # the conversion is not the identity here


def test_sample_to_eps_recovers_noise():
    x0, eps, ab, x_t = _noisy_pair()
    assert torch.allclose(sample_to_eps(x0, x_t, ab), eps, atol=1e-4)


def test_to_eps_follows_prediction_type(teacher, monkeypatch):
    x0, eps, _, _ = _noisy_pair()
    t = torch.tensor([10, 500, 990])
    ab = teacher.alpha_bar(t)
    x_t = teacher.add_noise(x0, eps, t)
    assert torch.allclose(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    assert teacher.prediction_type == "epsilon"
    assert torch.equal(teacher.to_eps(eps, x_t, t), eps)
    monkeypatch.setattr(teacher, "prediction_type", "v_prediction")
    assert torch.allclose(teacher.to_eps(ab.sqrt() * eps - (1 - ab).sqrt() * x0, x_t, t), eps, atol=1e-4)
    monkeypatch.setattr(teacher, "prediction_type", "sample")
    assert torch.allclose(teacher.to_eps(x0, x_t, t), eps, atol=1e-3)


# ------------------------------------------------------------------ loading the tiny teacher


def test_tiny_teacher_loads_through_load_teacher(teacher, tiny_teacher_dir, capfd):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert isinstance(teacher.unet, UNet2DConditionModel) and isinstance(teacher.vae, AutoencoderKL)
    assert isinstance(teacher.text_encoder, CLIPTextModel) and isinstance(teacher.tokenizer, CLIPTokenizer)
    assert isinstance(teacher.scheduler, DDPMScheduler)
    assert teacher.device == torch.device("cpu") and teacher.dtype == torch.float32
    assert (teacher.image_size, teacher.latent_size, teacher.latent_channels, teacher.vae_scale_factor) == (64, 16, 4, 4)
    assert teacher.num_train_timesteps == 1000 and teacher.prediction_type == "epsilon"
    ac = teacher.alphas_cumprod
    assert ac.shape == (1000,) and ac.dtype == torch.float32
    assert bool((ac[1:] < ac[:-1]).all()) and abs(ac[0].item() - (1 - 0.00085)) < 1e-6
    t = torch.tensor([0, 999, 500])
    assert teacher.alpha_bar(t).shape == (3, 1, 1, 1) and torch.equal(teacher.alpha_bar(t).flatten(), ac[t])
    for module in (teacher.unet, teacher.vae, teacher.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    # a complete StableDiffusionPipeline folder
    index = json.loads((tiny_teacher_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["safety_checker"] == [None, None]
    # the config object and the explicit dtype take the same path, and loading prints nothing
    capfd.readouterr()
    again = load_teacher(TeacherConfig(name_or_path=str(tiny_teacher_dir), dtype="fp32"), "cpu")
    assert capfd.readouterr() == ("", "")
    assert torch.equal(next(again.unet.parameters()), next(teacher.unet.parameters()))


def test_encode_decode_images(teacher):
    rgb = torch.rand(2, 3, 64, 64, requires_grad=True)
    latents = teacher.encode_images(rgb)
    assert latents.shape == (2, 4, 16, 16) and latents.dtype == torch.float32
    latents.square().sum().backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    # posterior mean (deterministic) times the scaling factor, inputs mapped to [-1, 1]
    with torch.no_grad():
        ref = teacher.vae.encode(rgb * 2 - 1).latent_dist.mean * teacher.vae.config.scaling_factor
        assert torch.allclose(teacher.encode_images(rgb), ref, atol=1e-6)
        assert torch.equal(teacher.encode_images(rgb), teacher.encode_images(rgb))
        small = teacher.encode_images(torch.rand(1, 3, 32, 48))  # resized to 64x64 first
        assert small.shape == (1, 4, 16, 16)
        images = teacher.decode_latents(torch.randn(2, 4, 16, 16) * 3)
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0


def test_prompts_are_cached(teacher):
    calls = []
    handle = teacher.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        teacher.clear_prompt_cache()
        hits, misses = teacher.prompt_cache_hits, teacher.prompt_cache_misses
        first = teacher.encode_prompts(["a red cube, front view", "", "a red cube, front view"])
        assert first.shape == (3, 77, 32) and not first.requires_grad
        assert len(calls) == 1 and teacher.prompt_cache_misses - misses == 2
        second = teacher.encode_prompts(["", "a red cube, front view"])
        assert len(calls) == 1 and teacher.prompt_cache_hits - hits == 3
        assert torch.equal(second[0], first[1]) and torch.equal(second[1], first[0])
        assert not torch.allclose(first[0], first[1])  # different prompts, different embeddings
    finally:
        handle.remove()


# ------------------------------------------------------------------ noise prediction


def test_predict_eps_single_cfg_call_matches_two_calls(teacher):
    unet_batches = []
    handle = teacher.unet.register_forward_hook(lambda mod, args, out: unet_batches.append(args[0].shape[0]))
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 16, 16, generator=g)
        t = torch.tensor([100, 800])
        cond = teacher.encode_prompts(["a red cube", "a blue sphere, back view"])
        uncond = teacher.encode_prompts(["", ""])
        with torch.no_grad():
            guided = teacher.predict_eps(x, t, cond, uncond, guidance_scale=7.5)
            assert unet_batches == [4]  # one call on [uncond, cond]
            eps_u = teacher.predict_eps(x, t, uncond)
            eps_c = teacher.predict_eps(x, t, cond)
            assert teacher.predict_eps(x, t, cond, uncond, guidance_scale=1.0).shape == x.shape
            assert unet_batches == [4, 2, 2, 2]  # scale 1 runs the conditional batch only
        assert guided.shape == x.shape and guided.dtype == torch.float32
        assert (eps_c - eps_u).abs().max() > 1e-3  # the prompt matters, so a swapped CFG would be caught
        assert torch.allclose(guided, apply_cfg(eps_u, eps_c, 7.5), atol=1e-4)
        assert not torch.allclose(guided, apply_cfg(eps_c, eps_u, 7.5), atol=1e-3)
        # per-sample timesteps are honoured (not swapped or broadcast from the first)
        swapped = teacher.predict_eps(x.flip(0), t.flip(0), cond.flip(0)).detach().flip(0)
        assert torch.allclose(swapped, eps_c, atol=1e-4)
    finally:
        handle.remove()


def test_predict_eps_is_differentiable(teacher):
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    cond = teacher.encode_prompts(["a red cube"] * 2)
    eps = teacher.predict_eps(x, torch.tensor([300, 600]), cond, teacher.encode_prompts(["", ""]), 5.0)
    assert eps.requires_grad  # not wrapped in no_grad: a LoRA or an image loss may need the graph
    eps.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# ------------------------------------------------------------------ errors


def test_missing_path_is_a_teacher_error(tmp_path):
    with pytest.raises(TeacherError) as excinfo:
        load_teacher(tmp_path / "nope", "cpu")
    assert "does not exist" in _one_line_teacher_error(excinfo)


def test_folder_without_unet_names_it(tiny_teacher_dir, tmp_path):
    broken = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(TeacherError) as excinfo:
        load_teacher(broken, "cpu")
    msg = _one_line_teacher_error(excinfo)
    assert "missing unet/;" in msg and "vae/" in msg  # names the missing one, then what a folder needs


def test_corrupt_weights_are_a_teacher_error(tiny_teacher_dir, tmp_path):
    broken = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(TeacherError) as excinfo:
        load_teacher(broken, "cpu")
    msg = _one_line_teacher_error(excinfo)
    assert "unet/" in msg and "corrupt" in msg


def test_unreachable_hub_id_is_a_teacher_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherError) as excinfo:
        load_teacher("text3d-tests/no-such-teacher", "cpu")
    msg = _one_line_teacher_error(excinfo)
    assert "text3d-tests/no-such-teacher" in msg and "local" in msg


def test_no_teacher_and_bad_dtype(monkeypatch):
    from text3d.errors import ConfigError

    monkeypatch.setenv("TEXT3D_DEFAULT_TEACHER", "")  # as if no embedded teacher were installed
    with pytest.raises(TeacherError):
        load_teacher(None, "cpu")
    with pytest.raises(ConfigError):
        load_teacher(TeacherConfig(name_or_path="/nope", dtype="fp8"), "cpu")


def test_path_or_hub_id():
    assert not is_local_path("stabilityai/stable-diffusion-2-1-base")
    assert is_local_path("./teacher") and is_local_path("/abs/x") and is_local_path("~/x")
    assert is_local_path("runs/teachers/sd") and is_local_path(".")


# ------------------------------------------------------------------ tokenizer and builder


def test_tokenizer_whole_words_and_fallback(teacher):
    from text3d.teacher.tokenizer import DEFAULT_WORDS, split_pieces

    tok = teacher.tokenizer
    ids = tok("a red cube, front view")["input_ids"]
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "cube</w>", ",</w>", "front</w>", "view</w>",
                      "<|endoftext|>"]
    assert tok.decode(ids, skip_special_tokens=True) == "a red cube , front view"
    for word in DEFAULT_WORDS:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == len(split_pieces(word)) == 1
    unknown = tok("zorblax", add_special_tokens=False)["input_ids"]
    assert len(unknown) > 1 and tok.unk_token_id not in unknown
    assert tok.decode(unknown) == "zorblax"
    assert tok.decode(tok("Héllo 42 🙂!")["input_ids"], skip_special_tokens=True) == "héllo 4 2 🙂!"
    assert tok.model_max_length == 77 == teacher.text_encoder.config.max_position_embeddings


def test_custom_words_tokenizer(tmp_path):
    from text3d.teacher.tokenizer import build_clip_tokenizer

    words = ["banana", "bandana", "anaconda", "aaaa", "t-shirt", "mississippi"]
    tok = build_clip_tokenizer(tmp_path / "tok", words)
    for word in ["banana", "bandana", "anaconda", "aaaa", "mississippi"]:
        assert tok.convert_ids_to_tokens(tok(word, add_special_tokens=False)["input_ids"]) == [word + "</w>"]
    assert tok.convert_ids_to_tokens(tok("t-shirt", add_special_tokens=False)["input_ids"]) == ["t</w>", "-</w>", "shirt</w>"]
    assert len(tok("red", add_special_tokens=False)["input_ids"]) == 3  # not in this vocabulary: bytes


def test_builder_is_seeded_and_refuses_to_clobber(tiny_teacher_dir, tmp_path):
    import importlib.util

    from safetensors.torch import load_file

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_teacher.py"
    spec = importlib.util.spec_from_file_location("make_tiny_teacher", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(tmp_path / "same")]) == 0
    assert script.main([str(tmp_path / "other"), "--seed", "1"]) == 0
    assert script.main([str(tmp_path / "same")]) == 2  # exists and not empty: refused
    name = "unet/diffusion_pytorch_model.safetensors"
    ref, same, other = (load_file(p / name) for p in (tiny_teacher_dir, tmp_path / "same", tmp_path / "other"))
    key = "conv_in.weight"
    assert torch.equal(ref[key], same[key]) and not torch.equal(ref[key], other[key])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_fingerprint_follows_weights_not_adapters(tiny_teacher_dir):
    """The cache key of teacher outputs: the same weights give the same fingerprint (a peft LoRA attached and
    trained on top does not change it), a changed base weight gives another."""
    from text3d.guidance.lora import LoRAScoreNetwork

    first = load_teacher(tiny_teacher_dir, "cpu")
    again = load_teacher(tiny_teacher_dir, "cpu")
    assert first.fingerprint() == again.fingerprint()
    assert len(first.fingerprint()) == 16

    lora = LoRAScoreNetwork(again, rank=4)
    with torch.no_grad():
        for p in lora.lora_parameters():
            p.add_(0.1)
    again._fingerprint = None  # recompute with the adapters in place
    assert again.fingerprint() == first.fingerprint()

    changed = load_teacher(tiny_teacher_dir, "cpu")
    with torch.no_grad():
        next(changed.unet.parameters()).add_(1e-3)
    assert changed.fingerprint() != first.fingerprint()
