#!/usr/bin/env python
"""Score the NeRF stage and the finished mesh stages of staged runs side by side with the judge.

    text3d generate "a yellow house" --stages nerf,geometry,texture --out runs/stages/a_yellow_house
    python scripts/stage_table.py runs/stages/* --out runs/stages/table.md

For each run (one made with ``--stages nerf,...``) the NeRF stage is exported on its own from the run's
NeRF checkpoint into ``RUN/stage_nerf/`` (marching cubes and baking, as a NeRF-only run would export it)
and scored with ``text3d eval run``; the run's own export (its last stage) is scored as it is. Both rows
use the same 8 judge views, so the table is NeRF-only against NeRF + mesh stages on the same prompts,
from the same NeRF.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KEYS = ("object_accuracy", "colour_accuracy", "view_accuracy", "silhouette_iou", "saturation", "janus_rate")
NERF_DIR = "stage_nerf"


def nerf_stage_folder(run_dir: Path) -> Path:
    """``RUN/stage_nerf``: the run's config with only the NeRF stage and a link to its NeRF checkpoint,
    exported (mesh files only) once."""
    from text3d.generate.config import to_yaml
    from text3d.generate.run import export_existing, load_run_config
    from text3d.runtime.run_folder import CHECKPOINT, CONFIG_NAME
    from text3d.runtime.atomic import atomic_write_text

    out = run_dir / NERF_DIR
    if (out / "export.done").is_file():
        return out
    cfg = load_run_config(run_dir)
    if "nerf" not in cfg.stages or len(cfg.stages) < 2:
        raise SystemExit(f"error: {run_dir} is not a staged run with a NeRF stage (its stages: {cfg.stages})")
    (out / CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
    cfg.stages = ["nerf"]
    atomic_write_text(out / CONFIG_NAME, to_yaml(cfg))
    link = out / CHECKPOINT
    if not link.exists():
        try:
            os.link(run_dir / CHECKPOINT, link)
        except OSError:  # another file system, or no hard links: a copy
            shutil.copy2(run_dir / CHECKPOINT, link)
    export_existing(out, formats=("glb",), video=False)
    atomic_write_text(out / "export.done", "ok\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders made with --stages nerf,geometry,texture")
    p.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = p.parse_args(argv)

    from text3d.eval.score_run import score_run
    from text3d.runtime.atomic import atomic_write_text

    rows = []
    for run in args.runs:
        if not (run / "run.json").is_file():
            print(f"skipping {run}: not a finished run (no run.json)", file=sys.stderr)
            continue
        nerf = score_run(nerf_stage_folder(run))
        mesh = score_run(run)
        rows.append((nerf["prompt"], nerf, mesh))
        print(f"{nerf['prompt']}: NeRF object {nerf['object_accuracy']:.0%} IoU {nerf['silhouette_iou']:.3f} | "
              f"+mesh object {mesh['object_accuracy']:.0%} IoU {mesh['silhouette_iou']:.3f}", flush=True)

    def cell(r, key):
        v = r.get(key)
        if v is None:
            return "-"
        return f"{v:.3f}" if key in ("silhouette_iou", "saturation") else f"{100 * v:.0f}%"

    lines = ["| prompt | stages | object | colour | view | silhouette IoU | saturation | Janus rate |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for prompt, nerf, mesh in rows:
        for label, r in (("NeRF", nerf), ("NeRF + geometry + texture", mesh)):
            lines.append(f"| {prompt} | {label} | " + " | ".join(cell(r, k) for k in KEYS) + " |")
    for label, index in (("NeRF", 1), ("NeRF + geometry + texture", 2)):
        means = {k: statistics.fmean(vs) if (vs := [r[index][k] for r in rows if r[index].get(k) is not None])
                 else None for k in KEYS}
        lines.append(f"| **mean of {len(rows)}** | {label} | " + " | ".join(cell(means, k) for k in KEYS) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        atomic_write_text(args.out, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
