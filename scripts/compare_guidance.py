#!/usr/bin/env python
"""Run `text3d generate` for a list of embedded-world prompts with SDS and/or VSD, score every run with
`text3d eval run`, and print (and write) a table side by side.

    python scripts/compare_guidance.py --out runs/compare                 # 12 prompts, SDS and VSD
    python scripts/compare_guidance.py --methods sds --out runs/compare  # only SDS
    python scripts/compare_guidance.py --methods sds --prompts text3d/assets/eval/prompts_3d_24.txt \
        --jobs 2 --out runs/t24                                          # the 24-prompt table, 2 at a time
    python scripts/compare_guidance.py --teacher /tmp/tiny --steps 5 ... # a smoke run
    python scripts/compare_guidance.py --methods sds --stages geometry,texture --from-runs runs/compare/sds \
        --label sds+mesh --out runs/compare                              # mesh stages on the SDS NeRFs
    python scripts/compare_guidance.py --methods truth --steps 600 --jobs 2 --prompts ... --out runs/t24
                                                                         # the ceiling: fitted to the world itself

``--methods truth`` (this script's own method, registered here as a plug-in would be) puts the world's own render
of the prompt's object, from the same camera, in the teacher's place: the asset is fitted to the ground truth by
``0.5 w ||render - truth||^2`` (lambertian shading with the light at the camera, as the world renders), then
exported and scored like any run. Its figures are the ceiling that the asset, its export and the judge allow a
guidance to reach on each prompt (the Janus rate of a perfect asset included).

Each method's settings are its config file (text3d/configs/default.yaml for SDS, text3d/configs/vsd.yaml for VSD)
plus the flags below. Finished runs (those with an eval.json) are reused, so an interrupted
comparison continues where it stopped. Results go to OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# 12 prompts: 9 primitives-and-colours, 3 with a distinct front and back (Janus-prone)
DEFAULT_PROMPTS = ["a red cube", "a blue torus", "a green sphere", "a yellow cone", "a purple cylinder",
                   "a orange pyramid", "a pink capsule", "a cyan octahedron", "a grey cube",
                   "a yellow house", "a blue mug", "a red car"]
TRUTH_FIT = ["train.p_albedo=0", "train.p_lambertian=1", "train.p_textureless=0", "train.light_jitter_deg=0",
             "train.albedo_warmup=0"]  # the `truth` method renders as the world does


@dataclass
class TruthFitConfig:
    weight: float = 0.05  # of 0.5 ||render - truth||^2 summed over the pixels (0.05: a step of the SDS loss's size)


class TruthFit:
    """The `truth` method's guidance: the gradient ``w (render - truth)`` towards the world's own render of the
    prompt's object and colour from each camera (module docstring)."""

    def __init__(self, teacher, cfg: TruthFitConfig, negative_prompt: str = ""):
        self.weight = cfg.weight

    def __call__(self, images, prompts, progress: float = 0.0, cameras=None):
        import torch

        from text3d.guidance.core import GuidanceOutput
        from text3d.toyworld.catalog import parse_caption
        from text3d.toyworld.render import DEFAULT_AMBIENT, render_objects

        obj, colour = parse_caption(prompts[0].split(",")[0])  # the view suffix dropped
        with torch.no_grad():
            truth = render_objects(obj, colour, cameras.to("cpu"), resolution=images.shape[-1],
                                   ambient=DEFAULT_AMBIENT)["rgb"].to(images)
        grad = self.weight * (images - truth).detach()
        loss = 0.5 * self.weight * (images - truth).pow(2).sum()
        return GuidanceOutput(loss, grad, torch.zeros(len(images), dtype=torch.long), images.detach(), 0)

    def update(self, output, prompts, cameras=None) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def register_truth() -> None:
    from text3d.generate.config import GUIDANCE_REGISTRY, GuidanceMethod

    if "truth" not in GUIDANCE_REGISTRY:
        GUIDANCE_REGISTRY.register("truth", GuidanceMethod(config=TruthFitConfig, build=TruthFit))


def run_one(prompt: str, method: str, out_dir: Path, args) -> dict:
    from text3d.generate.config import guidance_preset, load_config
    from text3d.eval.score_run import score_run
    from text3d.generate.run import generate

    eval_path = out_dir / "eval.json"
    if eval_path.is_file() and (out_dir / "run.json").is_file():
        return _row(json.loads(eval_path.read_text()), json.loads((out_dir / "run.json").read_text()), args.label)
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)  # an unfinished run: start it again
    preset = guidance_preset(method)  # the method's registry entry: vsd -> text3d/configs/vsd.yaml
    files = [preset] if preset is not None else []
    overrides = [f"guidance={method}", f"seed={args.seed}"] + (TRUTH_FIT if method == "truth" else [])
    if args.teacher:
        overrides.append(f"teacher.name_or_path={args.teacher}")
    if args.steps:
        overrides.append(f"train.steps={args.steps}")
    particles = args.vsd_particles if method == "vsd" else args.sds_particles
    overrides.append(f"train.particles={particles}")
    if args.stages:
        overrides.append(f"stages=[{args.stages}]")
    overrides += args.override
    cfg = load_config(files=files, overrides=overrides)
    cfg.prompt = prompt
    from_dir = args.from_runs / out_dir.name if args.from_runs else None
    generate(cfg, out=out_dir, show_progress=not args.quiet, video=False, from_dir=from_dir)
    result = score_run(out_dir)
    return _row(result, json.loads((out_dir / "run.json").read_text()), args.label)


def _row(result: dict, summary: dict, label: str | None = None) -> dict:
    diversity = result.get("diversity") or {}
    return {"prompt": result["prompt"], "guidance": label or result.get("guidance", summary.get("guidance")),
            "particles": result.get("particles", 1), "object": result["object_accuracy"],
            "colour": result["colour_accuracy"], "view": result["view_accuracy"], "iou": result["silhouette_iou"],
            "saturation": result.get("saturation"), "janus": result.get("janus_rate"),
            "janus_views": result.get("janus_views"), "janus_all": result.get("janus_rate_all_views"),
            "volume_iou": result.get("volume_iou"), "top_iou": result.get("top_iou"), "chamfer": result.get("chamfer"),
            "top_hole": result.get("top_hole"),
            "diversity_rgb": diversity.get("rgb_rms"), "diversity_silhouette": diversity.get("silhouette_disagreement"),
            "steps": summary["steps"], "seconds": summary["train_seconds"],
            "ms_per_step": 1000.0 * summary["train_seconds"] / max(1, summary["steps"])}


def _mean(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def _janus(rows) -> str:
    """Janus rate pooled over the views (flips / views) on the views the judge reads right on the truth, then over
    every clear view (score_run's docstring)."""
    counted = [r for r in rows if r.get("janus") is not None]  # a rate implies at least one readable view
    views = sum(r["janus_views"] for r in counted)
    flips = sum(r["janus"] * r["janus_views"] for r in counted)
    return f"{_fmt(flips / views if views else None, True)} / {_fmt(_mean(rows, 'janus_all'), True)}"


def _fmt(value, pct=False):
    if value is None:
        return "-"
    return f"{100 * value:.0f}%" if pct else f"{value:.3f}" if value < 10 else f"{value:.0f}"


def table(rows: list[dict], methods: list[str]) -> str:
    lines = ["| prompt | " + " | ".join(f"{m} obj / col / IoU / sat" for m in methods) + " |",
             "|---|" + "---|" * len(methods)]
    for prompt in dict.fromkeys(r["prompt"] for r in rows):
        cells = []
        for m in methods:
            r = next((r for r in rows if r["prompt"] == prompt and r["guidance"] == m), None)
            cells.append("-" if r is None else f"{_fmt(r['object'], True)} / {_fmt(r['colour'], True)} / "
                                               f"{_fmt(r['iou'])} / {_fmt(r['saturation'])}")
        lines.append(f"| {prompt} | " + " | ".join(cells) + " |")
    lines += ["", "| method | runs | particles | object acc | colour acc | view acc | silhouette IoU | saturation | "
                  "Janus rate (judge-readable / all clear views) | 3D volume IoU / top IoU / Chamfer / tori's hole open | particle diversity (RGB RMS / 1-IoU) | "
                  "ms per step |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for m in methods:
        rs = [r for r in rows if r["guidance"] == m]
        if not rs:
            continue
        div = (f"{_fmt(_mean(rs, 'diversity_rgb'))} / {_fmt(_mean(rs, 'diversity_silhouette'))}"
               if _mean(rs, "diversity_rgb") is not None else "-")
        geo = (f"{_fmt(_mean(rs, 'volume_iou'))} / {_fmt(_mean(rs, 'top_iou'))} / {_fmt(_mean(rs, 'chamfer'))} / "
               f"{_fmt(_mean(rs, 'top_hole'), True)}" if _mean(rs, "volume_iou") is not None else "-")
        lines.append(f"| {m} | {len(rs)} | {rs[0]['particles']} | {_fmt(_mean(rs, 'object'), True)} | "
                     f"{_fmt(_mean(rs, 'colour'), True)} | {_fmt(_mean(rs, 'view'), True)} | {_fmt(_mean(rs, 'iou'))} | "
                     f"{_fmt(_mean(rs, 'saturation'))} | {_janus(rs)} | {geo} | "
                     f"{div} | "
                     f"{statistics.median(r['ms_per_step'] for r in rs):.0f} |")
    return "\n".join(lines) + "\n"


def _without(argv: list[str], *options: str) -> list[str]:
    """``argv`` without the given options and their values (``--opt V`` and ``--opt=V``)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in options:
            skip = True
        elif not any(item.startswith(f"{o}=") for o in options):
            out.append(item)
    return out


def run_jobs(prompts: list[str], args, argv: list[str]) -> int:
    """Run the prompts in ``args.jobs`` child processes (this script, one thread each, a share of the prompts
    each, round robin); their runs are then reused by the caller's pass, which makes the table."""
    import subprocess
    import tempfile

    base = _without(argv, "--jobs", "--prompts", "--threads")
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for i in range(min(args.jobs, len(prompts))):
            share = Path(tmp) / f"prompts-{i}.txt"
            share.write_text("\n".join(prompts[i::args.jobs]) + "\n")
            cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--prompts", str(share), "--threads", "1",
                   "--jobs", "1", "--quiet"]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        codes = [proc.wait() for proc in procs]
    failed = [c for c in codes if c != 0]
    if failed:
        print(f"error: {len(failed)} of {len(codes)} jobs failed (exit {failed[0]}); finished runs are kept",
              file=sys.stderr)
        return failed[0]
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument("--methods", default="sds,vsd", help="comma-separated: sds, vsd, any registered method, or truth "
                   "(fitted to the world's own renders: the ceiling; module docstring)")
    p.add_argument("--prompts", type=Path, help="a file with one prompt per line (default: 12 built-in prompts)")
    p.add_argument("--teacher", help="teacher folder or hub id (default: the embedded teacher)")
    p.add_argument("--steps", type=int, help="train.steps (default: each method's config)")
    p.add_argument("--sds-particles", type=int, default=1)
    p.add_argument("--vsd-particles", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", help="comma-separated stages to run, e.g. nerf,geometry,texture (default: the config's)")
    p.add_argument("--from-runs", type=Path, help="folder of earlier runs (one per prompt, as OUT/METHOD) whose last "
                   "stage feeds this run's first stage (with --stages geometry,texture)")
    p.add_argument("--label", help="name of this configuration in the table and under OUT (default: the method)")
    p.add_argument("--override", action="append", default=[], help="extra key=value config override (repeatable)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--jobs", type=int, default=1, help="prompts run side by side in this many processes of one "
                   "thread each (2 on a 2-core machine); the table is made once all have finished")
    args = p.parse_args(argv)

    import torch

    from text3d.errors import UserError

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from text3d.generate.config import GUIDANCE_REGISTRY

    if "truth" in methods:
        register_truth()

    unknown = [m for m in methods if m not in GUIDANCE_REGISTRY]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}")
    if args.label and len(methods) != 1:
        p.error("--label names one configuration: give one method")
    prompts = ([line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
               if args.prompts else DEFAULT_PROMPTS)
    if args.jobs > 1 and len(prompts) > 1:
        code = run_jobs(prompts, args, sys.argv[1:] if argv is None else list(argv))
        if code:
            return code
    rows = []
    start = time.perf_counter()
    try:
        for prompt in prompts:
            for method in methods:
                out_dir = args.out / (args.label or method) / prompt.replace(" ", "_")
                row = run_one(prompt, method, out_dir, args)
                rows.append(row)
                print(f"[{time.perf_counter() - start:7.0f}s] {args.label or method} {prompt!r}: "
                      f"object {_fmt(row['object'], True)}, "
                      f"colour {_fmt(row['colour'], True)}, IoU {_fmt(row['iou'])}, "
                      f"{row['ms_per_step']:.0f} ms/step", flush=True)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished runs are kept and reused next time", file=sys.stderr)
        return 130
    from text3d.runtime.atomic import atomic_write_text

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"results-{args.label}" if args.label else "results"
    atomic_write_text(args.out / f"{stem}.json", json.dumps(rows, indent=2) + "\n")
    text = table(rows, [args.label] if args.label else methods)
    atomic_write_text(args.out / f"{stem}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
