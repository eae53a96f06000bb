#!/usr/bin/env python
"""The judge's view calls on the ground truth: the world's own front/back objects rendered at `text3d eval run`'s 8
orbit cameras, in every colour, and which clear front/back views the judge misreads there (the floor of the Janus
rate, which `text3d eval run` now counts only over the views the judge reads right on the truth).

    python scripts/judge_truth_views.py [--judge DIR] [--prompts FILE]

Prints one line per object and colour (the judge's view call per camera, azimuth 0, 45, ..., 315) and, with
--prompts (e.g. text3d/assets/eval/prompts_3d_24.txt), the Janus rate the truth itself would score on those prompts
if every clear view were counted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from text3d.cameras import CameraSamplerConfig, orbit_cameras  # noqa: E402
from text3d.eval.score_images import load_judge, score_predictions  # noqa: E402
from text3d.eval.score_run import N_VIEWS, OPPOSITE, RESOLUTION, clear_views  # noqa: E402
from text3d.toyworld.catalog import COLOURS, FRONT_BACK_OBJECTS, parse_caption  # noqa: E402
from text3d.toyworld.render import render_objects  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--judge", default=None, help="judge folder (default: the embedded judge)")
    parser.add_argument("--prompts", default=None, help="prompt file: also print the truth's Janus rate over it")
    args = parser.parse_args(argv)
    cfg = CameraSamplerConfig()
    cams = orbit_cameras(cfg, N_VIEWS)
    labels = cams.view_labels(cfg)
    clear = clear_views(cams, cfg)
    judge = load_judge(args.judge)
    flips: dict[tuple[str, str], list[bool]] = {}
    print(f"azimuths {[round(a) for a in cams.azimuth.tolist()]}; clear front/back views {clear}")
    for obj in FRONT_BACK_OBJECTS:
        for colour in COLOURS:
            with torch.no_grad():
                truth = render_objects([obj] * N_VIEWS, [colour] * N_VIEWS, cams, resolution=RESOLUTION)
            views = score_predictions(judge, truth["rgb"], [obj] * N_VIEWS, [colour] * N_VIEWS, labels)["predicted"]["view"]
            flips[obj, colour] = [views[i] == OPPOSITE[lab] for i, lab in clear]
            misread = [lab for (i, lab), f in zip(clear, flips[obj, colour]) if f]
            print(f"{obj:<8} {colour:<7} {' '.join(v[:5] for v in views)}" + (f"   misreads the {', '.join(misread)}"
                                                                                  if misread else ""))
    if args.prompts:
        pairs = [parse_caption(line.strip()) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        counted = [f for o, c in pairs if o in FRONT_BACK_OBJECTS for f in flips[o, c]]
        print(f"the truth's Janus rate over every clear view of {args.prompts}'s front/back prompts: "
              f"{100 * sum(counted) / max(1, len(counted)):.1f}% ({sum(counted)} of {len(counted)} views)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
