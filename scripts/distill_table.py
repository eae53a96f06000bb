#!/usr/bin/env python
"""Score a teacher at several DDIM step counts and distilled students side by side with the judge.

    python scripts/distill_table.py --out runs/distill-table \\
        --teacher-steps 50,4,1 \\
        --student swiftbrush=runs/d2-swiftbrush/student --student dmd=runs/d2-dmd/student \\
        --student "pd 8=runs/d2-pd/phases/pd_8" --student "guided 4 w=2=runs/d2-guided/phases/guided_pd_4@2"

Every model samples one image per prompt of ``--prompts`` (default text3d/assets/eval/prompts_216.txt: every
object and colour, plain and with a view suffix) from the same seed; a student samples with its own
timesteps (its ``student.json``), a teacher with DDIM and CFG ``--guidance-scale``. A trailing ``@W``
on a student path sets its guidance scale (w-conditioned students), a trailing ``#N`` samples with the first N
of its timesteps (a 4-step DMD2 generator in one step). The table (object / colour / view
accuracy, the view accuracy on the objects with a distinct front and back, Fréchet distance of judge
features against ``--reference`` renders, UNet passes per image (a CFG step counts two), images per second on
this machine) is printed and written to OUT/table.md and OUT/table.json. A row already measured into OUT by an
earlier call (same model weights, steps, w, seed, prompts and reference) is reused, so rows can be measured as
their students finish.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
ROW_NAME = "table_row.json"  # a measured row, reused by a later call with the same model, prompts and seed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--teacher", help="teacher folder (default: the embedded teacher)")
    p.add_argument("--teacher-steps", default="50,4,1", help="comma-separated DDIM step counts ('' for none)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="the teacher's CFG")
    p.add_argument("--student", action="append", default=[],
                   help="NAME=FOLDER[@W][#STEPS] (repeatable; FOLDER follows the last '='): guidance scale W, "
                        "the first STEPS of its timesteps")
    p.add_argument("--prompts", type=Path, default=REPO / "text3d" / "assets" / "eval" / "prompts_216.txt")
    p.add_argument("--reference", type=Path, help="toyworld dataset for the Fréchet distance")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from text3d.errors import UserError
    from text3d.eval.score_images import score_folder
    from text3d.teacher import load_teacher
    from text3d.distill2d.sample_cli import run_sample
    from text3d.prompts import read_prompts_file
    from text3d.runtime.atomic import atomic_write_text

    prompts = read_prompts_file(args.prompts)
    entries = [(f"teacher, {s} DDIM steps", args.teacher, int(s), args.guidance_scale, False)
               for s in args.teacher_steps.split(",") if s.strip()]
    for item in args.student:
        if "=" not in item:
            p.error(f"--student {item!r} is not NAME=FOLDER[@W][#STEPS]")
        name, folder = item.rsplit("=", 1)  # the last "=": a name may hold one ("guided 4, w=2")
        w = steps = None
        if "#" in folder:
            folder, steps_text = folder.rsplit("#", 1)
            steps = int(steps_text)
        if "@" in folder:
            folder, w_text = folder.rsplit("@", 1)
            w = float(w_text)
        entries.append((name, folder, steps, w, True))
    rows = []
    try:
        for name, folder, steps, w, is_student in entries:
            out = args.out / name.replace(" ", "_").replace(",", "").replace("=", "")
            source = str(folder or "embedded teacher")
            model = load_teacher(folder, "cpu")
            key = {"model": name, "folder": source, "weights": model.fingerprint(), "steps_asked": steps, "w": w,
                   "seed": args.seed, "prompts": str(args.prompts), "reference": str(args.reference)}
            done = out / ROW_NAME
            earlier = _read_row(done)
            if earlier is not None and earlier.get("key") == key:
                rows.append(earlier["row"])  # measured by an earlier call
                print(f"{name}: reused {done}", flush=True)
                continue
            passes = []  # the batch size of every UNet call: a CFG call counts each image twice
            hook = model.unet.register_forward_pre_hook(lambda module, inputs: passes.append(inputs[0].shape[0]))
            record = run_sample(prompts, out, teacher=model, steps=steps, n=1, guidance_scale=w, seed=args.seed,
                                batch_size=args.batch_size, progress=False)
            hook.remove()
            scores = score_folder(out, reference=args.reference)
            row = {"model": name, "folder": source, "steps": record["steps"],
                   "guidance_scale": record["guidance_scale"], "sampler": record["sampler"],
                   "object": scores["object_accuracy"], "colour": scores["colour_accuracy"],
                   "view": scores["view_accuracy"],
                   "view_front_back": scores.get("view_accuracy_front_back"), "frechet": scores.get("frechet_distance"),
                   "images_per_second": record["images_per_second"], "n": len(record["images"]),
                   "unet_passes_per_image": sum(passes) / len(record["images"])}
            row.update(training_record(folder) if is_student else {})
            rows.append(row)
            atomic_write_text(done, json.dumps({"key": key, "row": row}, indent=2) + "\n")
            print(f"{name}: object {100 * row['object']:.1f}%, colour {100 * row['colour']:.1f}%, "
                  f"{row['images_per_second']:.1f} img/s", flush=True)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lines = ["| model | steps | CFG / w | object acc | colour acc | view acc | view acc, front/back objects "
             "| Fréchet (judge features) | UNet passes per image | images/s | training steps | training time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fd = "-" if r["frechet"] is None else f"{r['frechet']:.2f}"
        view, view_fb = ("-" if v is None else f"{100 * v:.1f}%" for v in (r["view"], r["view_front_back"]))
        passes = "-" if r.get("unet_passes_per_image") is None else f"{r['unet_passes_per_image']:g}"
        trained = "-" if r.get("training_steps") is None else str(r["training_steps"])
        wall = "-" if r.get("training_seconds") is None else f"{r['training_seconds'] / 60:.1f} min"
        lines.append(f"| {r['model']} | {r['steps']} | {r['guidance_scale']:g} | {100 * r['object']:.1f}% | "
                     f"{100 * r['colour']:.1f}% | {view} | {view_fb} | {fd} | {passes} | "
                     f"{r['images_per_second']:.1f} | {trained} | {wall} |")
    table = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "table.md", table)
    atomic_write_text(args.out / "table.json", json.dumps(rows, indent=2) + "\n")
    print(table)
    return 0


def _read_row(path: Path) -> dict | None:
    """A row saved by an earlier call, or None (none there, or unreadable: then it is measured again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def training_record(folder) -> dict:
    """Training steps and wall time of a student folder, from its student.json and its run's summary.json.

    A progressive-distillation phase (``RUN/phases/NAME``) counts every round up to it, and its time is the
    sum of those rounds' times; a final student (``RUN/student``) takes the run's training time.
    """
    folder = Path(folder)
    try:
        card = json.loads((folder / "student.json").read_text())
    except (OSError, ValueError):
        return {}
    steps = card.get("steps_cumulative", card.get("steps_trained"))
    seconds = None
    if folder.parent.name == "phases":
        phases = sorted(folder.parent.glob("*/student.json"))
        cards = [json.loads(p.read_text()) for p in phases]
        upto = [c for c in cards if c.get("steps_cumulative", 0) <= (steps or 0)]
        if upto and all("phase_seconds_this_session" in c for c in upto):
            seconds = sum(c["phase_seconds_this_session"] for c in upto)
    else:
        try:
            summary = json.loads((folder.parent / "summary.json").read_text())
            if steps is None or summary.get("steps") == steps:  # the run's summary is of this student
                seconds = summary.get("train_seconds_total", summary.get("train_seconds_this_session"))
                steps = summary.get("steps", steps)
        except (OSError, ValueError):
            pass
    return {"training_steps": steps, "training_seconds": seconds}


if __name__ == "__main__":
    raise SystemExit(main())
