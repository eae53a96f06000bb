"""Why `sds.space` exists: the teacher VAE's colour nonlinearity, and SDS on bare pixels in latent vs image space.

    python scripts/probe_sds_space.py [--teacher DIR] [--steps 300] [--cfg 7.5,100] [--threads 2] [--out DIR]

Part 1 encodes one ground-truth render per prompt and decodes ``background + k * (latent - background)``
for k = 1, 1.5, 2, 3: CFG extrapolates latents like this, and the printed object colour shows what the
decoder makes of it. Part 2 runs SDS with no 3D at all (the parameters are the 64x64 pixels themselves,
through a sigmoid, from a grey disc on white) for each space and CFG scale, and prints the judge's
object and colour accuracy side by side. Sample strips go to ``--out`` when given. Needs a toyworld
dataset (``--data``, default /work/data/toyworld-10k or ``text3d toyworld render --n 2000``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from text3d.eval.score_images import load_judge, score_predictions  # noqa: E402
from text3d.guidance.sds import SDSConfig, SDSGuidance  # noqa: E402
from text3d.teacher import load_teacher  # noqa: E402
from text3d.toyworld.dataset import ToyworldDataset  # noqa: E402
from text3d.runtime.atomic import atomic_path  # noqa: E402

PROMPTS = [("pink", "capsule"), ("blue", "torus"), ("grey", "cube"), ("red", "cube"), ("green", "sphere"),
           ("yellow", "cone")]


def object_colour(image: torch.Tensor) -> list[float]:
    """Mean RGB of the non-white pixels of one [3, H, W] image."""
    mask = image.min(0).values < 0.9
    return [round(float(v), 2) for v in (image[:, mask].mean(1) if mask.any() else image.mean((1, 2)))]


def extrapolation_table(teacher, data: ToyworldDataset) -> None:
    a = data.arrays
    white = teacher.encode_images(torch.ones(1, 3, teacher.image_size, teacher.image_size))
    print("decoded object colour of background + k * (latent - background):")
    for colour, obj in PROMPTS:
        hits = np.where((a["object"] == data.objects.index(obj)) & (a["colour"] == data.colours.index(colour)))[0]
        if not len(hits):
            continue
        image = data.images([int(hits[0])])
        latent = teacher.encode_images(image)
        row = [f"k={k:g} {object_colour(teacher.decode_latents(white + k * (latent - white))[0])}"
               for k in (1.0, 1.5, 2.0, 3.0)]
        print(f"  a {colour} {obj:8s} render {object_colour(image[0])}  " + "  ".join(row))


def pixel_sds(teacher, judge, space: str, cfg: float, steps: int, seed: int) -> tuple[dict, torch.Tensor, float]:
    torch.manual_seed(seed)
    n, size = len(PROMPTS), teacher.image_size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    start = 1.0 - 0.5 * ((xx ** 2 + yy ** 2) < 0.35).float()
    logits = torch.logit(start.clamp(0.02, 0.98)).expand(n, 3, size, size).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.05)
    guidance = SDSGuidance(teacher, SDSConfig(guidance_scale=cfg, space=space))
    texts = [f"a {c} {o}" for c, o in PROMPTS]
    began = time.perf_counter()
    for step in range(steps):
        out = guidance(torch.sigmoid(logits), texts, progress=step / steps)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - began
    images = torch.sigmoid(logits).detach()
    result = score_predictions(judge, images, [o for _, o in PROMPTS], [c for c, _ in PROMPTS])
    return result, images, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None)
    parser.add_argument("--data", default="/work/data/toyworld-10k")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cfg", default="7.5,100", help="comma-separated CFG scales")
    parser.add_argument("--spaces", default="latent,image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for one PNG strip per (space, CFG)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher, device="cpu")
    judge = load_judge()
    with torch.no_grad():
        extrapolation_table(teacher, ToyworldDataset.load(args.data))
    print(f"\nSDS on bare pixels, {args.steps} steps, prompts: " + ", ".join(f"a {c} {o}" for c, o in PROMPTS))
    print(f"{'space':8s} {'CFG':>6s} {'object':>7s} {'colour':>7s} {'s/step':>7s}  judge's calls")
    for space in args.spaces.split(","):
        for cfg in [float(c) for c in args.cfg.split(",")]:
            result, images, seconds = pixel_sds(teacher, judge, space, cfg, args.steps, args.seed)
            calls = ", ".join(f"{c} {o}" for o, c in zip(result["predicted"]["object"], result["predicted"]["colour"]))
            print(f"{space:8s} {cfg:6g} {result['object_accuracy']:7.0%} {result['colour_accuracy']:7.0%} "
                  f"{seconds / args.steps:7.3f}  {calls}", flush=True)
            if args.out:
                from PIL import Image

                strip = (images.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
                path = Path(args.out) / f"pixel_sds_{space}_cfg{cfg:g}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    Image.fromarray(np.concatenate(list(strip), axis=1)).save(tmp, format="PNG")


if __name__ == "__main__":
    main()
