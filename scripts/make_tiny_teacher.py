#!/usr/bin/env python
"""Write a tiny random Stable-Diffusion-shaped teacher (a diffusers folder) for tests and CPU smoke runs.

    python scripts/make_tiny_teacher.py OUT_DIR [--seed S] [--force]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from text3d.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to create (must be absent or empty unless --force)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty folder")
    args = parser.parse_args(argv)
    from text3d.teacher.tiny import build_tiny_teacher

    try:
        path = build_tiny_teacher(args.out_dir, seed=args.seed, overwrite=args.force)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
