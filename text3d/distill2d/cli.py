"""`text3d distill2d`: train a one-step (or few-step) student from a teacher."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from text3d.errors import UserError


def distill2d(
    overrides: Optional[List[str]] = typer.Argument(None, help="Config overrides as key=value, e.g. fake.lr=0.0005."),
    method: str = typer.Option("swiftbrush", help="A registered method, built in swiftbrush | dmd | dmd2 | kd | pd | "
                               "guided (preset text3d/configs/distill2d/METHOD.yaml)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher: diffusers SD folder or hub id (default: embedded)."),
    prompts: Optional[Path] = typer.Option(None, help="Text file, one prompt per line (default: the embedded "
                                           "world's captions, with and without view suffixes)."),
    steps: Optional[int] = typer.Option(None, help="Student updates in all, for every method (steps=N); pd and "
                                        "guided split them over their rounds and stage 1 in proportion to "
                                        "trajectory.round_steps and stage1_steps (default: the preset's count)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default runs/distill2d-METHOD)."),
    config: Optional[List[Path]] = typer.Option(None, "--config", help="YAML file(s) merged over the method preset."),
    seed: Optional[int] = typer.Option(None, help="Random seed; a seed fixes the run."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this folder from its last checkpoint."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Score the student's samples with the judge at "
                                  "the end (embedded-world prompts)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Distil the teacher into a one-step (or few-step) student; `text3d sample --model OUT/student` uses it.

    Runs under `accelerate launch` on several GPUs unchanged."""
    from text3d.distill2d.config import load_distill_config
    from text3d.distill2d.run import distill, resume_distill

    flags = []
    for key, value in (("teacher", teacher), ("prompts_file", prompts), ("steps", steps), ("seed", seed),
                       ("device", device)):
        if value is not None:
            flags.append(f"{key}={value}")
    flags += list(overrides or [])
    if resume is not None:
        if config:
            raise UserError("--config cannot be combined with --resume (the run folder has its config)")
        result = resume_distill(resume, flags, show_progress=not quiet, evaluate=evaluate)
    else:
        cfg = load_distill_config(method, config or (), flags)
        result = distill(cfg, out or Path("runs") / f"distill2d-{method}", show_progress=not quiet, evaluate=evaluate)
    typer.echo(f"done: {result.steps} steps in {result.seconds:.1f}s; student in {result.student}")
    if result.scores:
        s = result.scores
        typer.echo(f"judge on {s['n_images']} one-sample-per-prompt images ({s['steps']} step(s)): object "
                   f"{100 * s['object_accuracy']:.1f}%, colour {100 * s['colour_accuracy']:.1f}%, view "
                   f"{100 * (s['view_accuracy'] or 0):.1f}%; {s['images_per_second']:.1f} images/s")
