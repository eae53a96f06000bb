#!/usr/bin/env python
"""Train the judge (object / colour / view classifier) on a toyworld dataset and write its model card.

    python scripts/train_judge.py --data DATASET_DIR --out text3d/assets/judge --steps 1500 --seed 0

Writes OUT/model.safetensors, OUT/config.json (architecture, label names, accuracies, settings) and
OUT/README.md (the model card: held-out accuracy per head, data, settings, reproduce command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from text3d.errors import UserError  # noqa: E402


def model_card(report: dict, data_dir: Path, meta: dict, command: str, out: Path) -> str:
    hold, train = report["holdout_accuracy"] or {}, report["train_accuracy"]
    cfg = report["config"]

    def pct(d, h):
        return f"{100 * d[h]:.2f}%" if d and h in d else "n/a"

    per_view = report.get("holdout_view_accuracy_per_object") or {}
    per_object = ("| object | view accuracy |\n|---|---|\n" + "\n".join(
        f"| {name} | {100 * acc:.1f}% |" for name, acc in per_view.items())) if per_view else "(no held-out data)"
    rows = "\n".join(f"| {h} | {pct(hold, h)} | {pct(train, h)} |" for h in ("object", "colour", "view"))
    settings = "\n".join(f"| {k} | {v} |" for k, v in cfg.items())
    return f"""# text3d judge

A small CNN ({report['n_parameters']:,} parameters, {cfg['image_size']}x{cfg['image_size']} RGB input,
{len(cfg['channels'])} conv blocks {cfg['channels']}, {cfg['embed_dim']}-d embedding) with three heads
that name the object, the colour and the view label of a toyworld image. `text3d eval` uses it as the
project's analogue of CLIP R-precision, and its {cfg['embed_dim']}-d embedding as the feature space of
the Fréchet distance. Load it with `text3d.eval.judge.Judge.load("{out}")`.

## Held-out accuracy

Measured on {report['n_holdout']} ground-truth renders held out of training (a seeded
{100 * cfg['holdout']:.0f}% split of the dataset); train accuracy on up to 4096 training examples.

| head | held-out | train |
|---|---|---|
{rows}

View accuracy is bounded below 100%: some objects look the same from several sides (a sphere's
front, side and back views are one image). Held-out view accuracy per object:

{per_object}

## Data

* dataset: `{data_dir}` ({meta.get('n', '?')} renders at {meta.get('resolution', '?')} px, world seed
  {meta.get('seed', '?')})
* objects ({len(meta['objects'])}): {', '.join(meta['objects'])}
* colours ({len(meta['colours'])}): {', '.join(meta['colours'])}
* view labels: {', '.join(meta['view_labels'])}
* train / held-out examples: {report['n_train']} / {report['n_holdout']}

## Training

AdamW with linear warm-up and cosine decay, summed cross-entropy of the three heads (label smoothing
{cfg['label_smoothing']}), augmentation: random translation (up to {100 * cfg['max_shift']:.0f}% of the
image), scale {cfg['scale_range'][0]}-{cfg['scale_range'][1]} and brightness x(1 +- {cfg['brightness']});
no horizontal flips (they turn a front view into a different object view).
{report['seconds']:.0f} s on {report['torch_threads']} CPU thread(s), {datetime.date.today().isoformat()}.

| setting | value |
|---|---|
{settings}

## Reproduce

```
{command}
```
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="toyworld dataset folder (meta.json + shards)")
    parser.add_argument("--out", type=Path, default=Path("text3d/assets/judge"), help="output folder (default text3d/assets/judge)")
    parser.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the batches")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--holdout", type=float, default=0.1, help="held-out fraction (default 0.1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a busy 2-core machine two OpenMP threads are up to "
                             "10x slower than one; 0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--eval-every", type=int, default=0, help="log held-out accuracy every N steps")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    args = parser.parse_args(argv)

    import torch

    from text3d.eval.judge import train_judge
    from text3d.toyworld.dataset import ToyworldDataset
    from text3d.runtime.atomic import atomic_write_text
    from text3d.utils.backends import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if not 0.0 < args.holdout < 1.0:
            raise UserError(f"--holdout must be between 0 and 1, got {args.holdout}")
        data = ToyworldDataset.load(args.data)
        judge, report = train_judge(data, steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                                    holdout=args.holdout, eval_every=args.eval_every, progress=not args.quiet,
                                    device=resolve_device(args.device))
        command = " ".join(["python scripts/train_judge.py", "--data", shlex.quote(str(args.data)), "--out",
                            shlex.quote(str(args.out)), "--steps", str(args.steps), "--seed", str(args.seed)]
                           + ([f"--batch-size {args.batch_size}"] if args.batch_size != 64 else [])
                           + ([f"--lr {args.lr}"] if args.lr != 3e-3 else [])
                           + ([f"--holdout {args.holdout}"] if args.holdout != 0.1 else [])
                           + ([f"--threads {args.threads}"] if args.threads != 1 else []))
        info = {"holdout_accuracy": report["holdout_accuracy"], "train_accuracy": report["train_accuracy"],
                "holdout_view_accuracy_per_object": report["holdout_view_accuracy_per_object"],
                "n_train": report["n_train"], "n_holdout": report["n_holdout"],
                "data": {"path": str(args.data), "n": data.meta.get("n"), "seed": data.meta.get("seed"),
                         "resolution": data.meta.get("resolution")},
                "train": report["config"], "seconds": report["seconds"], "command": command}
        judge.cpu().save(args.out, info=info)
        atomic_write_text(args.out / "README.md", model_card(report, args.data, data.meta, command, args.out))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    hold = report["holdout_accuracy"]
    print(json.dumps({"out": str(args.out), "holdout_accuracy": hold, "seconds": report["seconds"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
