#!/usr/bin/env python
"""How much a view-aware teacher's prediction depends on its camera input, against how much it depends on the
prompt's view suffix: is the camera what tells it which way the object faces?

    python scripts/camera_sensitivity.py [--teacher DIR] [--samples 16] [--seed 0] [--grid OUT.png]

For noisy latents ``x_t`` (``t`` in 300, 500, 700; ``--samples`` draws each) and the front/back objects' prompts,
it prints mean absolute differences of the noise prediction ``eps(x_t, t, prompt, camera)``:

  left / right     the camera at azimuth +a against -a (a = 45, 90, 135; elevation 15): the same view label,
                   the object turned the other way; only the camera can tell them apart
  camera / none    a camera against the "no camera" input (zeros) the teacher was also trained on
  front / back     the prompt's suffix ", front view" against ", back view", the camera dropped
  front / back by camera   the plain prompt with the camera at azimuth 0 against 180: the view told by the
                   camera alone (what ``text3d teacher train --suffix-drop`` teaches)

A teacher that uses the camera for the facing direction has left/right of the order of front/back; one that has
only learnt that a camera is present has left/right near 0 and camera/none well above it. ``--grid`` writes DDIM
samples (30 steps, CFG 7.5) of "a red car, side view" and "a red snowman, side view" from the same noise at
azimuth +90 and -90 beside the true renders: they should face opposite ways, as the truth does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def camera(azimuth: float, n: int):
    from text3d.cameras import CameraSamplerConfig, spherical_cameras

    cfg = CameraSamplerConfig()
    full = lambda v: torch.full((n,), float(v))  # noqa: E731
    return spherical_cameras(full(cfg.eval_elevation), full(azimuth), full(cfg.eval_radius), full(cfg.eval_fovy))


@torch.no_grad()
def sensitivities(teacher, samples: int, seed: int) -> dict[str, float]:
    from text3d.toyworld.catalog import FRONT_BACK_OBJECTS

    g = torch.Generator().manual_seed(seed)
    prompts = [f"a red {o}" for o in FRONT_BACK_OBJECTS]
    n = len(prompts) * samples
    shape = (n, teacher.unet.config.in_channels, teacher.latent_size, teacher.latent_size)
    sums = {"left / right": 0.0, "camera / none": 0.0, "front / back": 0.0, "front / back by camera": 0.0}
    ts = (300, 500, 700)
    for t in ts:
        x = torch.randn(shape, generator=g)
        tt = torch.full((n,), t)

        def eps(suffix: str, cams):
            cond = teacher.encode_prompts([p + suffix for p in prompts for _ in range(samples)])
            with teacher.viewing(cams):
                return teacher.predict_eps(x, tt, cond)

        for a in (45.0, 90.0, 135.0):
            label = ", front view" if a < 60 else ", side view" if a < 120 else ", back view"
            plus, minus = eps(label, camera(a, n)), eps(label, camera(-a, n))
            sums["left / right"] += float((plus - minus).abs().mean()) / 3
            sums["camera / none"] += float((plus - eps(label, None)).abs().mean()) / 3
        sums["front / back"] += float((eps(", front view", None) - eps(", back view", None)).abs().mean())
        sums["front / back by camera"] += float((eps("", camera(0.0, n)) - eps("", camera(180.0, n))).abs().mean())
    return {k: v / len(ts) for k, v in sums.items()}


@torch.no_grad()
def facing_grid(teacher, path: Path, seed: int) -> None:
    from PIL import Image

    from text3d.teacher.sampling import sample_images
    from text3d.toyworld.render import render_objects

    rows, n = [], 4
    for obj in ("car", "snowman"):
        for az in (90.0, -90.0):
            cams = camera(az, n)
            truth = render_objects([obj], ["red"], cams[:1], teacher.image_size)["rgb"]
            with teacher.viewing(cams):
                images = sample_images(teacher, [f"a red {obj}, side view"] * n, steps=30,
                                       generator=torch.Generator().manual_seed(seed))
            rows.append(torch.cat([truth[0], *images], dim=2))
    grid = (torch.cat(rows, dim=1).permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype("uint8")
    Image.fromarray(grid).save(path)
    print(f"wrote {path} (rows: car +90, car -90, snowman +90, snowman -90; first column the truth)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="teacher folder (default: the embedded one)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="also write the facing grid to this .png")
    args = p.parse_args()
    from text3d.teacher import load_teacher

    teacher = load_teacher(args.teacher, "cpu")
    if not teacher.camera_dim:
        sys.exit("error: this teacher takes no camera (not view-aware)")
    for key, value in sensitivities(teacher, args.samples, args.seed).items():
        print(f"{key:24s} {value:.4f}")
    if args.grid:
        facing_grid(teacher, Path(args.grid), args.seed)


if __name__ == "__main__":
    main()
