#!/usr/bin/env python
"""Fine-tune a teacher's VAE decoder on the embedded world's renders, the encoder frozen, and write a teacher
folder with the new decoder.

    python scripts/finetune_vae_decoder.py --out runs/teacher-dec [--teacher DIR] [--images 8000] [--steps 3000]
        [--batch 16] [--lr 5e-4] [--threads 2] [--seed 0]

Why: the embedded teacher's VAE (64 px -> 16x16x4) loses the small parts that tell a front from a back: its
round trip D(E(x)) of the true snowman's front has no face, of the true car's front no headlights, of the house
no door, so image-space score distillation, whose target is decoded, can never ask for them (docs/guidance.md,
2026-12-05). The latent space is the encoder's, so a decoder trained alone leaves the UNet's latents valid.

Loss (``text3d.teacher_training.stages.vae_loss``): L1 + 5 MSE + edge L1 on the decoder's output from the frozen
posterior ``z = mu + sigma * n`` (as the VAE was trained), object pixels weighted ``1 + fg_weight``. Reported, on
held-out renders, before and after: the round trip's PSNR, and the judge's view accuracy on the round trips of the
front/back objects' true front and back views (9 colours, text3d eval run's cameras), next to its accuracy on
the renders themselves.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def render_images(n: int, seed: int) -> np.ndarray:
    from text3d.toyworld.generate import render_shard

    return render_shard(seed, 0, n, n)["images"]


def front_back_truth() -> tuple[torch.Tensor, list[str], list[str], list[str]]:
    """The true front (azimuth 0) and back (180) views of every front/back object in every colour."""
    from text3d.cameras import CameraSamplerConfig, spherical_cameras
    from text3d.toyworld.catalog import COLOURS, FRONT_BACK_OBJECTS
    from text3d.toyworld.render import render_objects

    cfg = CameraSamplerConfig()
    objs, cols, views, images = [], [], [], []
    for azimuth, label in ((0.0, "front"), (180.0, "back")):
        pairs = [(o, c) for o in FRONT_BACK_OBJECTS for c in COLOURS]
        cams = spherical_cameras(torch.full((len(pairs),), cfg.eval_elevation), torch.full((len(pairs),), azimuth),
                                 torch.full((len(pairs),), cfg.eval_radius), torch.full((len(pairs),), cfg.eval_fovy))
        images.append(render_objects([o for o, _ in pairs], [c for _, c in pairs], cams)["rgb"])
        objs += [o for o, _ in pairs]
        cols += [c for _, c in pairs]
        views += [label] * len(pairs)
    return torch.cat(images), objs, cols, views


@torch.no_grad()
def round_trip(vae, x01: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """D(E(x)) at the posterior mean, images in [0, 1]."""
    out = []
    for i in range(0, len(x01), batch):
        x = x01[i:i + batch] * 2 - 1
        out.append(((vae.decode(vae.encode(x).latent_dist.mean).sample + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def measure(vae, held_out: torch.Tensor, truth, judge) -> dict:
    from text3d.eval.score_images import score_predictions

    rec = round_trip(vae, held_out)
    psnr = float(-10 * torch.log10(((rec - held_out) ** 2).mean()))
    images, objs, cols, views = truth
    scores = score_predictions(judge, round_trip(vae, images), objs, cols, views)
    return {"psnr": psnr, "view_accuracy_front_back": scores["view_accuracy"],
            "object_accuracy_front_back": scores["object_accuracy"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="teacher folder (default: the embedded one)")
    p.add_argument("--out", required=True, help="where to write the teacher with the new decoder")
    p.add_argument("--images", type=int, default=8000)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--fg-weight", type=float, default=4.0)
    p.add_argument("--edge-weight", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from text3d.eval.score_images import load_judge
    from text3d.teacher.loader import DEFAULT_TEACHER_DIR
    from text3d.teacher_training.stages import vae_loss
    from text3d.teacher import load_teacher

    src = Path(args.teacher) if args.teacher else Path(DEFAULT_TEACHER_DIR)
    out = Path(args.out)
    if out.exists():
        sys.exit(f"error: {out} exists; pick a new --out")
    teacher = load_teacher(str(src), "cpu")
    vae = teacher.vae.float()
    judge = load_judge()

    t0 = time.perf_counter()
    data = torch.from_numpy(render_images(args.images, args.seed + 1000)).permute(0, 3, 1, 2).float() / 255.0
    held_out = torch.from_numpy(render_images(512, args.seed + 2000)).permute(0, 3, 1, 2).float() / 255.0
    truth = front_back_truth()
    print(f"rendered {len(data)} + {len(held_out)} images in {time.perf_counter() - t0:.0f}s", flush=True)

    vae.eval()
    before = measure(vae, held_out, truth, judge)
    with torch.no_grad():
        truth_scores = __import__("text3d.eval.score_images", fromlist=["x"]).score_predictions(
            judge, truth[0], truth[1], truth[2], truth[3])
    print(f"before: {json.dumps(before)}; the judge on the renders themselves: view "
          f"{truth_scores['view_accuracy']:.3f}", flush=True)

    for prm in vae.parameters():
        prm.requires_grad_(False)
    trainable = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for prm in trainable:
        prm.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    vae.decoder.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(data), (args.batch,), generator=g)
        x = data[idx] * 2 - 1
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        loss, stats = vae_loss(rec, x, post, 0.0, args.edge_weight, 5.0, args.fg_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step} loss {stats['loss']:.4f} psnr {stats['psnr']:.2f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    vae.eval()
    after = measure(vae, held_out, truth, judge)
    print(f"after: {json.dumps(after)}", flush=True)

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(tmp / "vae")
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    (tmp / "decoder_finetune.json").write_text(json.dumps(
        {"source": str(src), "images": args.images, "steps": args.steps, "batch": args.batch, "lr": args.lr,
         "fg_weight": args.fg_weight, "edge_weight": args.edge_weight, "seed": args.seed,
         "before": before, "after": after, "judge_on_renders_view_accuracy": truth_scores["view_accuracy"]},
        indent=1) + "\n")
    tmp.rename(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
