#!/usr/bin/env python
"""Train the embedded teacher: a wrapper of `text3d teacher train` (text3d/teacher_training/cli.py), same options.

    python scripts/train_teacher.py --data DIR [--render N] [--out DIR] [--work runs/teacher-train] ...
    python scripts/train_teacher.py --init text3d/assets/teacher --data DIR --out DIR --unet-steps N ...

Kept so that the command lines recorded in model cards and docs still run; `text3d teacher train --help` lists
the options.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from text3d.cli import main as text3d_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """`text3d teacher train ARGV`: 0 on success; errors exit (one line on stderr) with their exit code."""
    return text3d_main(["teacher", "train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
