#!/usr/bin/env python
"""Train the embedded teacher (a small Stable-Diffusion-format latent diffusion model) on the synthetic world.

    python scripts/train_teacher.py --data DIR [--render N] [--out text3d/assets/teacher] [--work runs/teacher-train]
        [--vae-steps N] [--unet-steps N] [--batch-size B] [--vae-batch-size B] [--lr LR] [--vae-lr LR]
        [--seed S] [--device auto|cpu|cuda] [--precision auto|fp32|bf16|fp16] [--threads N]
        [--resume | --fresh] [--time-budget-min M] [--checkpoint-every N] [--no-preview] [--no-progress]
    python scripts/train_teacher.py --init text3d/assets/teacher --data DIR --out DIR --unet-steps N [--view-repeat K] ...

Stage 1 trains the VAE, stage 2 the UNet and the text encoder on cached latents; the result is
written with save_pretrained into --out (atomically) with a model card README.md. Ctrl-C saves a
checkpoint and exits 130; --resume continues the current stage from its last checkpoint.
With --init, only stage 2 runs, as a fine-tune of the teacher folder given (its VAE, tokenizer and
latent scaling kept), with the examples whose view can be seen repeated --view-repeat times.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from text3d.errors import UserError  # noqa: E402
from text3d.teacher_training.stages import TeacherTrainConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = TeacherTrainConfig()
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="toyworld dataset folder (meta.json + shards)")
    p.add_argument("--render", type=int, metavar="N", help="render N examples into --data first if it has no meta.json")
    p.add_argument("--render-seed", type=int, help="seed of the rendered dataset (default: --seed)")
    p.add_argument("--fake", type=int, metavar="N",
                   help="write N fake coloured-shape examples into --data if it has no meta.json (smoke runs)")
    p.add_argument("--out", type=Path, default=REPO / d.out, help="teacher folder to write")
    p.add_argument("--work", type=Path, default=REPO / d.work, help="checkpoints, latents cache, samples")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--unet-steps", type=int, default=d.unet_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="UNet stage batch size")
    p.add_argument("--vae-batch-size", type=int, default=d.vae_batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the UNet and text encoder")
    p.add_argument("--vae-lr", type=float, default=d.vae_lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda[:N]")
    p.add_argument("--precision", default=d.precision, help="auto (bf16/fp16 autocast on CUDA, fp32 on CPU) | fp32 | "
                                                            "bf16 | fp16")
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads (0 = every core available)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue from the last checkpoint of the current stage")
    group.add_argument("--fresh", action="store_true", help="delete the work folder's checkpoints and start over")
    p.add_argument("--time-budget-min", type=float, help="stop at this wall-clock budget (minutes), still write the model")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--no-preview", action="store_true", help="do not sample a preview grid at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (periodic log lines only)")
    p.add_argument("--init", type=Path, help="fine-tune this teacher folder instead of training from scratch")
    p.add_argument("--view-repeat", type=int, default=3,
                   help="with --init: copies per epoch of the examples whose view can be seen")
    p.add_argument("--repeat-views", metavar="LABELS",
                   help="with --init: repeat only the visible-view examples with these view labels (comma-separated, "
                        "e.g. front,back; default every label); the other visible-view examples are kept and seen once")
    p.add_argument("--replay", type=int, metavar="N",
                   help="with --init: keep only N examples without a visible view (a seeded choice; default all)")
    p.add_argument("--text-lr-scale", type=float, default=d.text_lr_scale,
                   help="the text encoder's learning rate as a multiple of --lr")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA decay of the shipped UNet/text weights")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    args = p.parse_args(argv)
    for name in ("vae_steps", "unet_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("batch_size", "vae_batch_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.view_repeat < 1:
        p.error("--view-repeat must be >= 1")
    if args.repeat_views is not None:
        from text3d.cameras import VIEW_LABELS

        args.repeat_views = [v.strip() for v in args.repeat_views.split(",") if v.strip()]
        unknown = [v for v in args.repeat_views if v not in VIEW_LABELS]
        if unknown or not args.repeat_views:
            p.error(f"--repeat-views: unknown view label(s) {', '.join(unknown) or '(none given)'}; "
                    f"choose from {', '.join(VIEW_LABELS)}")
    if args.time_budget_min is not None and args.time_budget_min <= 0:
        p.error("--time-budget-min must be > 0")
    return args


def reproduce_command(argv: list[str], meta: dict) -> str:
    """The command line of this run; a real (non-fake) dataset gets --render/--render-seed so it can be rebuilt."""
    args = list(argv)
    if not meta.get("fake") and "--render" not in args and meta.get("n") is not None:
        args += ["--render", str(meta["n"]), "--render-seed", str(meta.get("seed", 0))]
    return shlex.join(["python", "scripts/train_teacher.py", *args])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from text3d.teacher_training.data import load_dataset, write_fake_dataset
    from text3d.teacher_training.finetune import finetune_teacher
    from text3d.teacher_training.run import train_teacher

    try:
        t0 = time.perf_counter()
        if args.fake and not (args.data / "meta.json").is_file():
            write_fake_dataset(args.data, args.fake, seed=args.seed if args.render_seed is None else args.render_seed)
        dataset = load_dataset(args.data, render=args.render,
                               seed=args.seed if args.render_seed is None else args.render_seed)
        if args.render:
            print(f"dataset {args.data}: {len(dataset)} examples ({time.perf_counter() - t0:.0f} s)", flush=True)
        cfg = TeacherTrainConfig(
            out=str(args.out), work=str(args.work), vae_steps=args.vae_steps, unet_steps=args.unet_steps,
            vae_batch_size=args.vae_batch_size, batch_size=args.batch_size, vae_lr=args.vae_lr, lr=args.lr,
            seed=args.seed, device=args.device, precision=args.precision, threads=args.threads,
            checkpoint_every=args.checkpoint_every, warmup_steps=args.warmup_steps, text_lr_scale=args.text_lr_scale,
            ema_decay=args.ema_decay, time_budget_min=args.time_budget_min, resume=args.resume,
            fresh=args.fresh, preview=not args.no_preview, progress=not args.no_progress,
            command=reproduce_command(argv, dataset.meta))
        if args.init is not None:
            info = finetune_teacher(cfg, dataset, args.init, view_repeat=args.view_repeat, replay=args.replay,
                                    data_path=str(args.data), repeat_views=args.repeat_views,
                                    log=lambda m: print(m, flush=True))
            r = info["results"]
            print(f"done in {r['wall_time_s'] / 60:.1f} min: {r['steps_run']} fine-tune steps; teacher in {args.out}")
            return 0
        info = train_teacher(cfg, dataset, data_path=args.data, log=lambda m: print(m, flush=True))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    r = info["results"]
    print(f"done in {r['wall_time_s'] / 60:.1f} min: VAE {r['vae_steps_run']} steps, UNet {r['unet_steps_run']} "
          f"steps; teacher in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
