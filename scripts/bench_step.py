"""Time one SDS or VSD step of `text3d generate`, split into its parts, against the bare teacher work.

    python scripts/bench_step.py [--teacher DIR] [--methods sds,vsd,vsd-fused] [--resolution 64] [--steps 30]
                                 [--warmup 5] [--device auto] [--threads N] [--clock wall|cpu]
                                 [--space latent|image] [key=value ...]

A step (``--space latent``, the default: latent-space guidance as DreamFusion and ProlificDreamer do; ``image``:
the embedded teacher's setting, CFG on decoded x0 predictions and the gradient on the render's pixels, so
``encode`` has no graph and ``backward`` goes through the renderer only, and ``unet`` includes the decodes) is
split into

  render    the NeRF's forward pass
  encode    the VAE encoder's forward pass on the render, resized to the teacher's input (512 px for SD 2.1)
  unet      the teacher's CFG forward (one UNet call on the [uncond, cond] batch)
  lora      VSD only: the LoRA baseline's prediction plus the LoRA's training step (forward, backward, AdamW);
            ``vsd-fused`` is VSD with ``vsd.fused_lora=true`` (the prediction is the training step's forward);
            ``vsd-i2`` / ``vsd-i3`` VSD whose LoRA trains on one step in 2 / 3 (``vsd.lora_interval``)
  backward  the backward pass through the VAE encoder and the renderer
  optim     the asset's Adam step

and compared with the **bare teacher work** of one step, timed on its own: one CFG UNet forward plus the VAE
encode and its backward (the least any latent-space score-distillation step must do). Printed: the median of
each part (for a method whose LoRA trains on one step in k, the median over windows of k steps of their mean, so
that it is the mean step), ``SDS step / bare teacher work`` (target <= 1.3) and ``VSD step / SDS step`` (target <= 1.6;
ProlificDreamer's own implementation is about 3). The methods' steps are taken in turn, one step of each per
round, each method with its own copy of the teacher, so a machine whose speed drifts during the run (a shared
virtual machine) stretches them alike and their ratio holds (the bare teacher work is timed before them, so
``SDS step / bare teacher work`` is not protected so). Without --teacher a tiny random teacher is built in a
temporary folder; for SD 2.1 size build one with ``scripts/make_sd_teacher.py --shape sd21-base``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from text3d.cameras import jittered_light_dirs, sample_cameras  # noqa: E402
from text3d.generate.config import load_config  # noqa: E402
from text3d.generate.trainer import AssetTrainer  # noqa: E402
from text3d.guidance import vsd as vsd_module  # noqa: E402
from text3d.guidance.core import target_trick_loss  # noqa: E402
from text3d.prompts import prompts_for_cameras  # noqa: E402
from text3d.runtime.seed import seed_everything  # noqa: E402
from text3d.teacher.sampling import predict_x0  # noqa: E402
from text3d.teacher import load_teacher  # noqa: E402
from text3d.utils.backends import resolve_device  # noqa: E402

PARTS = ("render", "encode", "unet", "lora", "backward", "optim", "step")
clock = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process, all its threads), which
# other work on the machine does not stretch; wall time otherwise


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Timed:
    """Wraps a bound method and adds its wall time to ``self.seconds`` (the device synchronised around it)."""

    def __init__(self, fn, device):
        self.fn, self.device, self.seconds = fn, device, 0.0

    def __call__(self, *args, **kwargs):
        sync(self.device)
        t0 = clock()
        out = self.fn(*args, **kwargs)
        sync(self.device)
        self.seconds += clock() - t0
        return out


def bare_teacher_work(teacher, resolution: int, steps: int, warmup: int, guidance_scale: float = 100.0,
                      space: str = "latent") -> float:
    """Median seconds of one CFG UNet forward + the VAE encode of a render and its backward (no renderer);
    in image space the encode has no graph and the two x0 predictions are decoded instead."""
    device = teacher.device
    cond = teacher.encode_prompts(["a corgi"])
    uncond = teacher.encode_prompts([""])
    times = []
    for i in range(steps + warmup):
        image = torch.rand(1, 3, resolution, resolution, device=device, requires_grad=True)
        sync(device)
        t0 = clock()
        if space == "image":
            with torch.no_grad():
                latents = teacher.encode_images(image)
                t = torch.randint(20, 980, (1,), device=device)
                noisy = teacher.add_noise(latents, torch.randn_like(latents), t)
                eps = teacher.predict_eps_many(noisy, t, [uncond, cond])
                x0 = [teacher.decode_latents(predict_x0(teacher, noisy, e, t)) for e in eps]
            pixels = teacher.resize_images(image)
            target_trick_loss(pixels, pixels.detach() - (x0[0] + guidance_scale * (x0[1] - x0[0]))).backward()
        else:
            latents = teacher.encode_images(image)
            with torch.no_grad():
                t = torch.randint(20, 980, (1,), device=device)
                noise = torch.randn_like(latents)
                eps = teacher.predict_eps(teacher.add_noise(latents.detach(), noise, t), t, cond, uncond,
                                          guidance_scale)
            target_trick_loss(latents, (1 - teacher.alpha_bar(t)) * (eps - noise)).backward()
        sync(device)
        if i >= warmup:
            times.append(clock() - t0)
    return statistics.median(times)


METHODS = {"sds": [], "vsd": [], "vsd-fused": ["vsd.fused_lora=true"], "vsd-i2": ["vsd.lora_interval=2"],
           "vsd-i3": ["vsd.lora_interval=3"]}  # name: the method's own overrides


class MethodSteps:
    """The generate trainer's step of one ``method`` (one of :data:`METHODS`), run one step at a time and split into
    its parts; :meth:`step` returns the seconds of each part. ``close()`` takes the LoRA off the teacher."""

    def __init__(self, teacher, teacher_dir: str, method: str, resolution: int, total_steps: int,
                 overrides: list[str], device: torch.device, space: str = "latent"):
        overrides = [*overrides, *METHODS[method]]
        method = method.split("-")[0]
        cfg = load_config(overrides=[f"teacher.name_or_path={teacher_dir}", f"guidance={method}",
                                     f"train.resolution={resolution}", "train.high_resolution=null",
                                     f"train.steps={total_steps}", *overrides, f"{method}.space={space}"])
        cfg.prompt = "a corgi"
        seed_everything(0)
        self.cfg, self.teacher, self.device, self.space, self.resolution = cfg, teacher, device, space, resolution
        self.trainer = AssetTrainer(cfg, teacher, device, Path(tempfile.mkdtemp()), show_progress=False)
        self.guidance = guidance = self.trainer.guidance
        self.window = int(getattr(guidance.cfg, "lora_interval", 1))  # steps per window (_median_of_windows)
        self.lora_timer = None
        if guidance.lora is not None:  # time the LoRA's prediction inside the guidance call (fused: with its step)
            self.lora_timer = _Timed(guidance.lora.predict_eps, device)
            guidance.lora.predict_eps = self.lora_timer
            self._fused_original = original = vsd_module._FusedLoRAStep.predict_eps
            timer = self.lora_timer

            def timed_fused(fused, *args, **kwargs):  # this instance's fused steps only
                if fused.vsd is not guidance:
                    return original(fused, *args, **kwargs)
                sync(device)
                t0 = clock()
                out = original(fused, *args, **kwargs)
                sync(device)
                timer.seconds += clock() - t0
                return out

            vsd_module._FusedLoRAStep.predict_eps = timed_fused

    def step(self, step: int) -> dict[str, float]:
        cfg, trainer, guidance, device, teacher = self.cfg, self.trainer, self.guidance, self.device, self.teacher
        resolution = self.resolution
        if self.lora_timer is not None:
            self.lora_timer.seconds = 0.0
        sync(device)
        t0 = clock()
        trainer.renderer.train()
        trainer.renderer.update_occupancy(step)
        cams = sample_cameras(cfg.camera, cfg.train.batch_size).to(device)
        out = trainer.renderer(cams, resolution, resolution, shading=trainer.choose_shading(step),
                               light_dirs=jittered_light_dirs(cams, 45.0))
        sync(device); t1 = clock()
        pixels = None
        if self.space == "image":  # as ScoreDistillation.__call__: the gradient goes into the resized pixels
            pixels = teacher.resize_images(out["rgb"]).float()
            with torch.no_grad():
                latents = teacher.encode_images(pixels.detach())
        else:
            latents = teacher.encode_images(out["rgb"])
        sync(device); t2 = clock()
        prompts = prompts_for_cameras(cfg.prompt, cams, cfg.prompts, cfg.camera)
        g = guidance.guide_latents(latents, prompts, progress=step / cfg.train.steps, cameras=cams, image=pixels)
        sync(device); t3 = clock()
        loss = g.loss + cfg.train.lambda_orientation * out.get("orientation_loss", 0.0)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync(device); t4 = clock()
        trainer.optimizer.step()
        sync(device); t5 = clock()
        guidance.update(g, prompts, cams)  # VSD: the LoRA's training step; SDS: nothing
        sync(device); t6 = clock()
        lora_predict = self.lora_timer.seconds if self.lora_timer is not None else 0.0
        return {"render": t1 - t0, "encode": t2 - t1, "unet": t3 - t2 - lora_predict, "lora": lora_predict + t6 - t5,
                "backward": t4 - t3, "optim": t5 - t4, "step": t6 - t0}

    def close(self) -> None:
        if self.lora_timer is not None:
            vsd_module._FusedLoRAStep.predict_eps = self._fused_original
            del self.guidance.lora.predict_eps  # the class's method again
            self.guidance.lora.remove()  # the teacher's UNet as it was


def bench_methods(teacher_dir: str, methods: list[str], resolution: int, steps: int, warmup: int,
                  overrides: list[str], device: torch.device, space: str = "latent") -> dict[str, dict[str, float]]:
    """Median seconds of each part of each method's step, the methods' steps taken in turn (one step of each, then
    the next round), so that a machine whose speed drifts slows them alike. Each method has its own teacher, so
    VSD's LoRA adapters are not in the SDS steps' UNet."""
    runs: dict[str, MethodSteps] = {}
    parts = {m: {k: [] for k in PARTS} for m in methods}
    try:
        for m in methods:
            runs[m] = MethodSteps(load_teacher(teacher_dir, device), teacher_dir, m, resolution, steps + warmup,
                                  overrides, device, space)
        for step in range(1, steps + warmup + 1):
            for m, run in runs.items():
                timed = run.step(step)
                if step > warmup:
                    for key, value in timed.items():
                        parts[m][key].append(value)
    finally:
        for run in reversed(list(runs.values())):  # the last patch of the fused step first, so the original returns
            run.close()
    return {m: {k: _median_of_windows(v, runs[m].window) for k, v in p.items()} for m, p in parts.items()}


def _median_of_windows(values: list[float], window: int) -> float:
    """The median over runs of ``window`` consecutive steps of their mean: with ``vsd.lora_interval = k`` one step in
    k trains the LoRA, so a window of k holds one of each kind and the figure is the mean step, robust to outliers."""
    means = [statistics.fmean(values[i:i + window]) for i in range(0, len(values) - window + 1, window)]
    return statistics.median(means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--methods", default="sds,vsd", help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                        help="wall: elapsed time; cpu: this process's CPU time (for a machine shared with other work)")
    parser.add_argument("--space", default="latent", choices=("latent", "image"),
                        help="where the guidance works (module docstring); image is the embedded teacher's default")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    if args.teacher is None:
        from text3d.teacher.tiny import build_tiny_teacher

        args.teacher = str(build_tiny_teacher(Path(tempfile.mkdtemp()) / "tiny"))
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods takes {', '.join(METHODS)}, got {args.methods!r}")
    teacher = load_teacher(args.teacher, device)
    print(f"device={device} threads={torch.get_num_threads()} clock={args.clock} render={args.resolution}px "
          f"teacher={args.teacher} "
          f"({teacher.image_size}px, {teacher.dtype}, {teacher.prediction_type}) steps={args.steps} space={args.space}")
    bare = bare_teacher_work(teacher, args.resolution, args.steps, args.warmup, space=args.space)
    results = bench_methods(args.teacher, methods, args.resolution, args.steps, args.warmup, args.overrides, device,
                            args.space)
    width = max(10, *(len(m) + 2 for m in methods))
    print(f"{'part (median ms)':<18}" + "".join(f"{m:>{width}}" for m in methods))
    for key in PARTS:
        print(f"{key:<18}" + "".join(f"{results[m][key] * 1000:>{width}.1f}" for m in methods))
    what = "VAE encode + CFG UNet forward + 2 decodes" if args.space == "image" else "CFG UNet forward + VAE encode + its backward"
    print(f"{'bare teacher work':<18}{bare * 1000:>10.1f}   ({what})")
    if "sds" in results:
        ratio = results["sds"]["step"] / bare
        print(f"SDS step / bare teacher work = {ratio:.2f}   (target <= 1.3: {'met' if ratio <= 1.3 else 'NOT met'})")
    for m in (m for m in METHODS if m.startswith("vsd")):
        if m in results:
            print(f"{m} step / bare teacher work = {results[m]['step'] / bare:.2f}")
            if "sds" in results:
                ratio = results[m]["step"] / results["sds"]["step"]
                print(f"{m} step / SDS step = {ratio:.2f}   (target <= 1.6: {'met' if ratio <= 1.6 else 'NOT met'})")


if __name__ == "__main__":
    main()
