"""SDS: the gradient that reaches the latents is exactly w(t) * (eps_hat - eps), with the project's CFG."""

import pytest
import torch

from text3d.guidance import SDSConfig, SDSGuidance, TimestepSchedule, target_trick_loss
from text3d.guidance.sds import sanitize_grad
from text3d.teacher import load_teacher
from text3d.teacher.teacher import apply_cfg


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_teacher(str(tiny_teacher_dir), torch.device("cpu"))


def test_target_trick_gradient_is_exact():
    latents = torch.randn(3, 4, 8, 8, requires_grad=True)
    grad = torch.randn(3, 4, 8, 8)
    target_trick_loss(latents, grad).backward()
    assert torch.allclose(latents.grad, grad, atol=1e-6, rtol=0)  # z - (z - g) == g up to rounding


def test_sds_gradient_reaching_latents(teacher):
    torch.manual_seed(0)
    scale = 7.0
    guidance = SDSGuidance(teacher, SDSConfig(guidance_scale=scale))
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    latents = teacher.encode_images(images)
    latents.retain_grad()
    t = torch.tensor([100, 700])
    noise = torch.randn(latents.shape)
    prompts = ["a red cube, front view", "a red cube, back view"]
    out = guidance.guide_latents(latents, prompts, t=t, noise=noise)
    out.loss.backward()

    # independent computation: two plain UNet calls and the CFG formula written out
    with torch.no_grad():
        ab = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        cond = teacher.encode_prompts(prompts)
        uncond = teacher.encode_prompts(["", ""])
        eps_c = teacher.unet(noisy, t, encoder_hidden_states=cond).sample
        eps_u = teacher.unet(noisy, t, encoder_hidden_states=uncond).sample
        eps_hat = eps_u + scale * (eps_c - eps_u)
        expected = (1 - ab) * (eps_hat - noise)
    assert torch.allclose(latents.grad, expected, atol=1e-5, rtol=1e-4)
    assert torch.allclose(out.grad, expected, atol=1e-5, rtol=1e-4)
    assert images.grad is not None and images.grad.abs().sum() > 0  # and it flows on into the images
    assert out.nonfinite == 0


def test_weight_is_one_minus_alpha_bar(teacher):
    guidance = SDSGuidance(teacher, SDSConfig())
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(guidance.weight(t).flatten(), 1 - teacher.alphas_cumprod[t])


def test_nan_guard_and_clipping():
    grad = torch.tensor([1.0, float("nan"), -5.0, float("inf")])
    clean, bad = sanitize_grad(grad, clip=2.0)
    assert bad == 2
    assert torch.equal(clean, torch.tensor([1.0, 0.0, -2.0, 0.0]))


def test_timestep_schedule_bounds_and_annealing():
    s = TimestepSchedule(1000, 0.02, 0.98)
    t = s.sample(10000, 0.5, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 20 and t.max() <= 979 and t.max() > 950
    a = TimestepSchedule(1000, 0.02, 0.98, anneal="linear", t_max_end=0.5)
    assert a.upper(0.0) == pytest.approx(0.98) and a.upper(1.0) == pytest.approx(0.5)
    assert a.upper(0.5) == pytest.approx(0.74)
    late = a.sample(10000, 1.0, generator=torch.Generator().manual_seed(0))
    assert late.max() <= round(0.5 * 999)
    with pytest.raises(ValueError):
        TimestepSchedule(1000, 0.5, 0.4)


def test_cfg_convention_matches_diffusers():
    u, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    assert torch.allclose(apply_cfg(u, c, 7.5), u + 7.5 * (c - u))


def test_image_space_sds_gradient_reaching_pixels(teacher):
    """space=image: CFG on the two decoded x0 predictions, clamped, and grad = w * (image - target) on the pixels."""
    torch.manual_seed(0)
    scale, weight = 4.0, 3.0
    guidance = SDSGuidance(teacher, SDSConfig(guidance_scale=scale, space="image", image_weight=weight))
    images = torch.rand(2, 3, 32, 32, requires_grad=True)  # rendered smaller than the teacher: resized
    t = torch.tensor([150, 800])
    prompts = ["a red cube", "a blue torus"]
    size = teacher.image_size
    with torch.no_grad():
        latents = teacher.encode_images(images)
    noise = torch.randn(latents.shape)
    out = guidance(images, prompts, t=t, noise=noise)
    out.loss.backward()

    with torch.no_grad():  # written out: two UNet calls, two decodes, CFG on the pixels
        resized = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        ab = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        x0 = {}
        for name, emb in (("c", teacher.encode_prompts(prompts)), ("u", teacher.encode_prompts(["", ""]))):
            eps = teacher.unet(noisy, t, encoder_hidden_states=emb).sample
            x0[name] = teacher.decode_latents((noisy - (1 - ab).sqrt() * eps) / ab.sqrt())
        target = (x0["u"] + scale * (x0["c"] - x0["u"])).clamp(0, 1)
        expected = weight * (resized - target)
    assert out.grad.shape == (2, 3, size, size)
    # (float32 rounding, times scale * weight, through the decoder: ~2e-5; CFG on eps instead would be off by ~0.1)
    assert torch.allclose(out.grad, expected, atol=2e-4, rtol=1e-4)
    # the pixel gradient is the resize's adjoint applied to that gradient: no encoder backward is involved
    probe = torch.rand(2, 3, 32, 32, requires_grad=True)
    torch.nn.functional.interpolate(probe, size=(size, size), mode="bilinear", align_corners=False).backward(out.grad)
    assert torch.allclose(images.grad, probe.grad, atol=1e-5, rtol=1e-4)
    assert not out.latents.requires_grad


def test_image_space_is_validated():
    from text3d.generate.config import load_config
    from text3d.errors import ConfigError

    assert load_config(overrides=["sds.space=image"]).sds.space == "image"
    with pytest.raises(ConfigError, match="sds.space must be latent or image"):
        load_config(overrides=["sds.space=pixels"])
    with pytest.raises(ConfigError, match="vsd.image_weight must be > 0"):
        load_config(overrides=["vsd.image_weight=0"])


def test_perp_neg_removes_only_the_orthogonal_part():
    from text3d.teacher.teacher import apply_perp_neg

    u = torch.zeros(1, 2)
    c = torch.tensor([[2.0, 0.0]])  # d = (2, 0)
    neg = torch.tensor([[3.0, 4.0]])  # neg - u = (3, 4): parallel part (3, 0), orthogonal part (0, 4)
    out = apply_perp_neg(u, c, [neg], torch.tensor([[0.5]]), 2.0)
    assert torch.allclose(out, torch.tensor([[4.0, -4.0]]))  # 2 * ((2, 0) - 0.5 * (0, 4))
    # no negatives, or zero weights: exactly the project's CFG
    assert torch.equal(apply_perp_neg(u, c, [], torch.zeros(0, 1), 7.5), apply_cfg(u, c, 7.5))
    assert torch.allclose(apply_perp_neg(u, c, [neg], torch.zeros(1, 1), 7.5), apply_cfg(u, c, 7.5))
    # a negative parallel to the positive direction changes nothing
    assert torch.allclose(apply_perp_neg(u, c, [3 * c], torch.ones(1, 1), 2.0), apply_cfg(u, c, 2.0))


def test_other_view_prompts():
    from text3d.prompts import other_view_prompts, split_view_suffix

    assert split_view_suffix("a red car, side view") == ("a red car", "side")
    assert split_view_suffix("a red car") == ("a red car", None)
    assert other_view_prompts("a red car, front view") == ["a red car, side view", "a red car, back view"]
    assert other_view_prompts("a red car, back view") == ["a red car, front view", "a red car, side view"]
    assert other_view_prompts("a red car") == [] and other_view_prompts("a red car, overhead view") == []


def test_perp_neg_sds_gradient_reaching_latents(teacher):
    torch.manual_seed(0)
    scale, w = 7.5, 0.8
    guidance = SDSGuidance(teacher, SDSConfig(guidance_scale=scale, perp_neg=w))
    latents = torch.randn(2, 4, 16, 16, requires_grad=True)
    t, noise = torch.tensor([300, 800]), torch.randn(2, 4, 16, 16)
    prompts = ["a red cube, front view", "a red cube"]  # the plain prompt has no negatives
    out = guidance.guide_latents(latents, prompts, t=t, noise=noise)
    with torch.no_grad():
        ab = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise

        def eps(texts):
            return teacher.unet(noisy, t, encoder_hidden_states=teacher.encode_prompts(texts)).sample

        eps_u, eps_c = eps(["", ""]), eps(prompts)
        d = (eps_c - eps_u).flatten(1)
        correction = torch.zeros_like(d)
        for neg in (["a red cube, side view", "a red cube"], ["a red cube, back view", "a red cube"]):
            n = (eps(neg) - eps_u).flatten(1)
            perp = n - (n * d).sum(1, keepdim=True) / (d * d).sum(1, keepdim=True) * d
            correction += torch.tensor([[w], [0.0]]) * perp
        eps_hat = eps_u + scale * (d - correction).view_as(eps_u)
        expected = (1 - ab) * (eps_hat - noise)
    assert torch.allclose(out.grad, expected, atol=1e-4, rtol=1e-4)
    plain = SDSGuidance(teacher, SDSConfig(guidance_scale=scale)).guide_latents(latents, prompts, t=t, noise=noise)
    assert torch.allclose(plain.grad[1], out.grad[1], atol=1e-5)  # no negatives for the plain prompt
    assert not torch.allclose(plain.grad[0], out.grad[0], atol=1e-3)  # the front view's did change


def test_cfg_rescale_keeps_the_conditional_colour_and_the_contrast():
    """rescale_cfg: phi 0 is plain CFG; phi 1 gives every channel the conditional prediction's mean and std (an
    image's colour), while the guided image's pattern (its normalised values) stays as CFG made it."""
    from text3d.teacher.teacher import rescale_cfg

    torch.manual_seed(0)
    u, c = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    guided = apply_cfg(u, c, 7.5)
    assert torch.equal(rescale_cfg(guided, c, 0.0), guided)
    full = rescale_cfg(guided, c, 1.0)
    assert torch.allclose(full.mean((2, 3)), c.mean((2, 3)), atol=1e-5)
    assert torch.allclose(full.std((2, 3)), c.std((2, 3)), atol=1e-5)
    norm = lambda x: (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)  # noqa: E731
    assert torch.allclose(norm(full), norm(guided), atol=1e-4)
    assert not torch.allclose(guided.mean((2, 3)), c.mean((2, 3)), atol=1e-2)  # CFG alone moved the colour
    half = rescale_cfg(guided, c, 0.5)
    assert torch.allclose(half, 0.5 * full + 0.5 * guided, atol=1e-6)


def test_cfg_rescale_in_image_and_latent_space_sds(teacher):
    """sds.cfg_rescale reaches the real branch in both spaces: image space rescales the decoded CFG image before
    the clamp, latent space the guided noise; 0 leaves the gradient bit-identical to plain CFG."""
    from text3d.generate.config import load_config
    from text3d.errors import ConfigError
    from text3d.teacher.teacher import rescale_cfg

    torch.manual_seed(0)
    images = torch.rand(1, 3, 32, 32)
    prompts, t = ["a grey cube"], torch.tensor([600])
    with torch.no_grad():
        latents = teacher.encode_images(images)
    noise = torch.randn(latents.shape)
    plain = SDSGuidance(teacher, SDSConfig(guidance_scale=7.5, space="image"))(images, prompts, t=t, noise=noise)
    zero = SDSGuidance(teacher, SDSConfig(guidance_scale=7.5, space="image", cfg_rescale=0.0))(
        images, prompts, t=t, noise=noise)
    assert torch.equal(plain.grad, zero.grad)
    phi = 0.7
    out = SDSGuidance(teacher, SDSConfig(guidance_scale=7.5, space="image", cfg_rescale=phi))(
        images, prompts, t=t, noise=noise)
    with torch.no_grad():
        size = teacher.image_size
        resized = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        ab = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        x0 = {}
        for name, emb in (("c", teacher.encode_prompts(prompts)), ("u", teacher.encode_prompts([""]))):
            eps = teacher.unet(noisy, t, encoder_hidden_states=emb).sample
            x0[name] = teacher.decode_latents((noisy - (1 - ab).sqrt() * eps) / ab.sqrt())
        target = rescale_cfg(apply_cfg(x0["u"], x0["c"], 7.5), x0["c"], phi).clamp(0, 1)
    assert torch.allclose(out.grad, resized - target, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(out.grad, plain.grad, atol=1e-3)

    lat = SDSGuidance(teacher, SDSConfig(guidance_scale=7.5, cfg_rescale=1.0)).guide_latents(
        latents.clone().requires_grad_(True), prompts, t=t, noise=noise)
    with torch.no_grad():
        eps_u, eps_c = teacher.predict_eps_branches(noisy, t, teacher.encode_prompts(prompts),
                                                    teacher.encode_prompts([""]))
        expected = (1 - ab) * (rescale_cfg(apply_cfg(eps_u, eps_c, 7.5), eps_c, 1.0) - noise)
    assert torch.allclose(lat.grad, expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="sds.cfg_rescale must be in"):
        load_config(overrides=["sds.cfg_rescale=1.5"])


def test_inverted_noise_sds_uses_ddim_inversion_of_the_latents(teacher):
    """noise=inversion (SDI): the noise is the DDIM inversion's, eps_inv = (x_t - sqrt(ab) x) / sqrt(1 - ab), and the
    gradient w (eps_CFG(x_t) - eps_inv), computed here by hand."""
    from text3d.errors import ConfigError
    from text3d.generate.config import load_config

    torch.manual_seed(0)
    scale, steps = 5.0, 2
    guidance = SDSGuidance(teacher, SDSConfig(guidance_scale=scale, noise="inversion", inversion_steps=steps))
    latents = torch.randn(2, teacher.latent_channels, teacher.latent_size, teacher.latent_size, requires_grad=True)
    t = torch.tensor([200, 600])
    prompts = ["a red cube, front view", "a red cube, back view"]
    out = guidance.guide_latents(latents, prompts, t=t)
    out.loss.backward()
    with torch.no_grad():
        cond, uncond = teacher.encode_prompts(prompts), teacher.encode_prompts(["", ""])
        ab = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
        s1 = (t.float() / steps).round().long()  # 0 -> t/2 -> t
        e0 = teacher.unet(latents, torch.zeros_like(t), encoder_hidden_states=cond).sample
        ab1 = teacher.alphas_cumprod[s1].view(-1, 1, 1, 1)
        x1 = ab1.sqrt() * latents + (1 - ab1).sqrt() * e0
        e1 = teacher.unet(x1, s1, encoder_hidden_states=cond).sample
        x_t = ab.sqrt() * (x1 - (1 - ab1).sqrt() * e1) / ab1.sqrt() + (1 - ab).sqrt() * e1
        eps_inv = (x_t - ab.sqrt() * latents) / (1 - ab).sqrt()
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * eps_inv
        eps_c = teacher.unet(noisy, t, encoder_hidden_states=cond).sample
        eps_u = teacher.unet(noisy, t, encoder_hidden_states=uncond).sample
        expected = (1 - ab) * (eps_u + scale * (eps_c - eps_u) - eps_inv)
    assert torch.allclose(out.grad, expected, atol=1e-4, rtol=1e-3)
    assert torch.allclose(latents.grad, expected, atol=1e-4, rtol=1e-3)
    random = SDSGuidance(teacher, SDSConfig(guidance_scale=scale)).guide_latents(latents, prompts, t=t)
    assert not torch.allclose(random.grad, expected, atol=1e-2)  # the random noise gives another gradient
    late = SDSGuidance(teacher, SDSConfig(noise="inversion", inversion_steps=steps, inversion_from=0.5))
    torch.manual_seed(3)
    early = late.draw_noise(latents, t, cond, progress=0.4)  # before inversion_from: random noise
    torch.manual_seed(3)
    assert torch.equal(early, torch.randn(latents.shape))
    assert torch.allclose(late.draw_noise(latents, t, cond, progress=0.5), eps_inv, atol=1e-4, rtol=1e-3)
    assert load_config(overrides=["sds.noise=inversion"]).sds.noise == "inversion"
    with pytest.raises(ConfigError, match="sds.noise must be random or inversion"):
        load_config(overrides=["sds.noise=ddim"])
    with pytest.raises(ConfigError, match="vsd.inversion_steps must be >= 1"):
        load_config(overrides=["vsd.inversion_steps=0"])


def test_guidance_scale_ramp_follows_the_annealing_start(teacher):
    """guidance_scale_end: CFG constant until t_anneal_start, then linear to the end value; the gradient at a late
    progress is the one a constant CFG of that value gives."""
    from text3d.errors import ConfigError
    from text3d.generate.config import load_config

    cfg = SDSConfig(guidance_scale=5.0, guidance_scale_end=9.0, t_anneal_start=0.5, space="image")
    ramp = SDSGuidance(teacher, cfg)
    assert [ramp.guidance_scale_at(p) for p in (0.0, 0.5, 0.75, 1.0)] == [5.0, 5.0, 7.0, 9.0]
    assert SDSGuidance(teacher, SDSConfig(guidance_scale=5.0)).guidance_scale_at(1.0) == 5.0
    images = torch.rand(1, 3, 32, 32)
    t, noise = torch.tensor([300]), torch.randn(1, teacher.latent_channels, teacher.latent_size, teacher.latent_size)
    late = ramp(images, ["a red cube"], progress=0.75, t=t, noise=noise).grad
    fixed = SDSGuidance(teacher, SDSConfig(guidance_scale=7.0, space="image"))(images, ["a red cube"], t=t, noise=noise)
    early = ramp(images, ["a red cube"], progress=0.25, t=t, noise=noise).grad
    assert torch.allclose(late, fixed.grad, atol=1e-5) and not torch.allclose(early, late, atol=1e-3)
    with pytest.raises(ConfigError, match="guidance_scale_end"):
        load_config(overrides=["sds.guidance_scale_end=-1"])


def test_multi_step_target_takes_ddim_steps_with_image_space_cfg(teacher):
    """target_steps = K: the real target is K t / T DDIM steps down (at least one), each step's x0 the encoded,
    clamped image-space CFG of the two decoded predictions; written out here for t = 500, K = 4 (two steps,
    500 -> 250), with a UNet call counter; before target_steps_from the one-step target is used."""
    from text3d.errors import ConfigError
    from text3d.generate.config import load_config
    from text3d.guidance.core import target_timesteps

    assert [s.tolist() for s in target_timesteps(torch.tensor([500]), 8, 1000)] == [[500], [375], [250], [125]]
    assert [s.tolist() for s in target_timesteps(torch.tensor([300, 100]), 8, 1000)] == [[300, 100], [150, 50]]
    assert [s.tolist() for s in target_timesteps(torch.tensor([40]), 8, 1000)] == [[40]]
    torch.manual_seed(0)
    scale = 4.0
    cfg = SDSConfig(guidance_scale=scale, space="image", target_steps=4, target_steps_from=0.5)
    guidance = SDSGuidance(teacher, cfg)
    images = torch.rand(1, 3, teacher.image_size, teacher.image_size)
    t = torch.tensor([500])
    prompts = ["a red cube"]
    with torch.no_grad():
        latents = teacher.encode_images(images)
    noise = torch.randn(latents.shape)
    calls = {"n": 0}
    unet_forward = teacher.unet.forward

    def counted(*args, **kwargs):
        calls["n"] += 1
        return unet_forward(*args, **kwargs)

    teacher.unet.forward = counted
    try:
        out = guidance(images, prompts, progress=0.6, t=t, noise=noise)
        n_multi = calls["n"]
        one = guidance(images, prompts, progress=0.4, t=t, noise=noise)  # before target_steps_from
        n_one = calls["n"] - n_multi
    finally:
        del teacher.unet.forward
    assert (n_multi, n_one) == (2, 1)  # one CFG pair (one batch of 2) a step

    def guided(z, s):
        ab = teacher.alphas_cumprod[s].view(-1, 1, 1, 1)
        x0 = {}
        for name, emb in (("c", teacher.encode_prompts(prompts)), ("u", teacher.encode_prompts([""]))):
            eps = teacher.unet(z, s, encoder_hidden_states=emb).sample
            x0[name] = teacher.decode_latents((z - (1 - ab).sqrt() * eps) / ab.sqrt())
        g = x0["u"] + scale * (x0["c"] - x0["u"])
        return g.clamp(0, 1), ab

    with torch.no_grad():
        ab = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
        z = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        first, _ = guided(z, t)
        x0 = teacher.encode_images(first)
        s = torch.tensor([250])
        ab_s = teacher.alphas_cumprod[s].view(-1, 1, 1, 1)
        z = ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * (z - ab.sqrt() * x0) / (1 - ab).sqrt()
        target, _ = guided(z, s)
        one_target, _ = guided(ab.sqrt() * latents + (1 - ab).sqrt() * noise, t)
    assert torch.allclose(out.grad, images - target, atol=2e-4, rtol=1e-4)
    assert torch.allclose(one.grad, images - one_target, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(out.grad, one.grad, atol=1e-2)
    with pytest.raises(ConfigError, match="sds.target_steps must be >= 1"):
        load_config(overrides=["sds.target_steps=0"])
    with pytest.raises(ConfigError, match="needs sds.space = image"):
        load_config(overrides=["sds.target_steps=4", "sds.space=latent"])
