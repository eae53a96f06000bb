"""Time one SDS step of `text3d generate`, split into render, VAE encode, UNet (guidance) and backward.

The split is that of latent-space SDS (`sds.space=latent`, set here whatever the config says), where the
VAE encoder is differentiated; image-space SDS encodes without a graph and decodes twice instead.

    python scripts/bench_step.py [--teacher DIR] [--resolution 64] [--steps 30] [--device auto] [key=value ...]

Without --teacher a tiny random teacher is built in a temporary folder. Prints the median time
of each part, the whole step, and the render share as ratios side by side.
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
from text3d.prompts import prompts_for_cameras  # noqa: E402
from text3d.teacher import load_teacher  # noqa: E402
from text3d.teacher.tiny import build_tiny_teacher  # noqa: E402
from text3d.generate.trainer import AssetTrainer  # noqa: E402
from text3d.utils.backends import resolve_device  # noqa: E402
from text3d.runtime.seed import seed_everything  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shading", default="mixed", help="albedo | lambertian | textureless | mixed (the run's mix)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    device = resolve_device(args.device)
    teacher_dir = args.teacher or str(build_tiny_teacher(Path(tempfile.mkdtemp()) / "tiny"))
    cfg = load_config(overrides=[f"teacher.name_or_path={teacher_dir}", f"train.resolution={args.resolution}",
                                 f"train.steps={args.steps + args.warmup}", *args.overrides, "sds.space=latent"])
    cfg.prompt = "a red cube"
    seed_everything(0)
    teacher = load_teacher(cfg.teacher, device)
    trainer = AssetTrainer(cfg, teacher, device, Path(tempfile.mkdtemp()), show_progress=False)
    parts = {k: [] for k in ("render", "vae_encode", "unet", "backward", "optim", "step")}
    res = cfg.train.resolution
    for step in range(1, args.steps + args.warmup + 1):
        sync(device); t0 = time.perf_counter()
        trainer.renderer.train()
        trainer.renderer.update_occupancy(step)
        cams = sample_cameras(cfg.camera, cfg.train.batch_size).to(device)
        shading = trainer.choose_shading(step) if args.shading == "mixed" else args.shading
        out = trainer.renderer(cams, res, res, shading=shading, light_dirs=jittered_light_dirs(cams, 45.0))
        sync(device); t1 = time.perf_counter()
        latents = teacher.encode_images(out["rgb"])
        sync(device); t2 = time.perf_counter()
        g = trainer.guidance.guide_latents(latents, prompts_for_cameras(cfg.prompt, cams, cfg.prompts),
                                           progress=step / cfg.train.steps)
        sync(device); t3 = time.perf_counter()
        loss = g.loss + cfg.train.lambda_orientation * out.get("orientation_loss", 0.0)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        sync(device); t4 = time.perf_counter()
        trainer.optimizer.step()
        sync(device); t5 = time.perf_counter()
        if step > args.warmup:
            for key, value in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t5 - t0)):
                value and parts[key].append(value)
    med = {k: statistics.median(v) * 1000 for k, v in parts.items()}
    print(f"device={device} threads={torch.get_num_threads()} resolution={res} teacher={teacher_dir} "
          f"shading={args.shading} steps={args.steps}")
    print(f"{'part':<12}{'median ms':>10}{'share':>8}")
    for key in ("render", "vae_encode", "unet", "backward", "optim"):
        print(f"{key:<12}{med[key]:>10.1f}{med[key] / med['step']:>8.1%}")
    print(f"{'step':<12}{med['step']:>10.1f}")
    teacher_ms = med["vae_encode"] + med["unet"]
    print(f"render : teacher (vae+unet) = {med['render'] / teacher_ms:.2f} : 1   "
          f"(backward includes both render and VAE-encoder gradients)")
    print(f"steps/s = {1000 / med['step']:.2f}")


if __name__ == "__main__":
    main()
