"""What a finished `text3d distill2d` run hands back, whichever trainer ran it: the result record, the
summary file's name and the judge's scores of the saved student (shared by ``run.py`` and
``trajectory.py``, so neither imports the other)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

EVAL_DIR = "eval_samples"
SUMMARY = "summary.json"


@dataclass
class DistillResult:
    out: Path
    steps: int
    seconds: float
    student: Path
    scores: dict | None = None
    files: dict = field(default_factory=dict)


def evaluate_student(student: Path, out: Path, prompts: Sequence[str], show_progress: bool = True) -> dict | None:
    """One sample per embedded-world prompt (all of the student's steps), scored by the judge; None when the
    prompts are not embedded-world captions or no judge is installed."""
    from text3d.eval.score_images import DEFAULT_JUDGE_DIR, score_folder
    from text3d.teacher import load_teacher
    from text3d.distill2d.sample_cli import run_sample
    from text3d.toyworld.catalog import parse_caption

    known = [p for p in dict.fromkeys(prompts) if parse_caption(p) is not None]
    if not known or not DEFAULT_JUDGE_DIR.is_dir():
        return None
    model = load_teacher(str(student), "cpu")
    record = run_sample(known, out, teacher=model, n=1, progress=show_progress, batch_size=64)
    scores = score_folder(out)
    return {k: scores.get(k) for k in ("object_accuracy", "colour_accuracy", "view_accuracy", "n_images")} | {
        "images_per_second": record["images_per_second"], "steps": record["steps"]}
