#!/usr/bin/env python
"""Write a random Stable-Diffusion-shaped teacher (the published SD 1.5 / 2.1 / 2.1-base architectures, random
weights, CLIP's real BPE tokenizer) as a diffusers folder: shapes, memory, speed and code paths at real size.

    python scripts/make_sd_teacher.py --shape sd15|sd21|sd21-base --out DIR [--width full|tiny] [--seed S]
                                      [--bpe FILE] [--force]

Full width is about 5 GB on disk in fp32: build it outside the repository (e.g. /work/sd-teachers/sd21-base).
The tokenizer's merges come from an installed open_clip (`pip install --no-deps open_clip_torch`) or --bpe.
See text3d/teacher/sd_shapes.py for what each shape reproduces.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from text3d.errors import UserError  # noqa: E402
from text3d.teacher.sd_shapes import SHAPES, WIDTHS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--shape", required=True, choices=SHAPES)
    parser.add_argument("--out", required=True, type=Path, help="folder to create (absent or empty unless --force)")
    parser.add_argument("--width", default="full", choices=WIDTHS, help="full (the published size) or tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bpe", default=None, help="CLIP's bpe_simple_vocab_16e6.txt.gz (default: from open_clip)")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty folder")
    args = parser.parse_args(argv)
    from text3d.teacher.sd_shapes import build_sd_teacher

    start = time.perf_counter()
    try:
        path = build_sd_teacher(args.out, args.shape, width=args.width, seed=args.seed, bpe=args.bpe,
                                overwrite=args.force)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"error: {exc.strerror or exc} ({exc.filename or args.out})", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"{path}  ({args.shape}, {args.width}, {size / 1e9:.2f} GB, {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
