"""Where a NeRF's corners went: the occupied set of a run's density field, three ways, one row per run.

For each run folder: the field's density on a ``--res``^3 grid, thresholded at the export's iso-level
(``export.threshold``, else the automatic one the export uses), shown as the projection seen from the top
(along y), the horizontal slice through the centre (y = 0) and the projection seen from the side (along z).
A cube's top projection and slice should be squares and a torus's slice a ring; a drum shows discs.

    python scripts/density_slices.py OUT.png RUN_DIR [RUN_DIR ...] [--res 96]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from text3d.export.marching import auto_threshold
from text3d.generate.run import load_run_config, load_stage_particles


def occupancy_views(run: Path, res: int) -> torch.Tensor:
    """[res, 3 res + 4] image in {0, 1}: top projection | centre slice | side projection."""
    cfg = load_run_config(run)
    renderer = load_stage_particles(run, cfg, torch.device("cpu"), ["nerf"], None)[0].eval()
    grid = renderer.density_grid(res)  # [x, y, z]
    level = auto_threshold(grid) if cfg.export.threshold is None else float(cfg.export.threshold)
    occupied = (grid > level).float()
    gap = torch.ones(res, 2)
    top, middle = occupied.amax(dim=1), occupied[:, res // 2, :]
    side = occupied.amax(dim=2).t().flip(0)  # rows: y from the top
    return torch.cat([top, gap, middle, gap, side], dim=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--res", type=int, default=96)
    args = parser.parse_args()
    rows = [occupancy_views(run, args.res) for run in args.runs]
    image = torch.cat(rows, dim=0).numpy()
    Image.fromarray((image * 255).astype(np.uint8)).resize((image.shape[1] * 2, image.shape[0] * 2)).save(args.out)
    print(f"wrote {args.out}: {len(rows)} run(s), top | centre slice | side")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
