"""`text3d distill2d` as library calls: a new run or a resumed one, then the saved student and, for
embedded-world prompts, the judge's scores of its samples."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from text3d.distill2d.config import SCORE_METHODS, Distill2DConfig, validate
from text3d.distill2d.trainer import CHECKPOINT, CONFIG_NAME, STUDENT_DIR, Distill2DTrainer, write_config
from text3d.errors import UserError
from text3d.runtime.run_folder import probe_writable
from text3d.runtime.atomic import atomic_write_text

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


def distill(cfg: Distill2DConfig, out: Path, show_progress: bool = True, teacher=None,
            evaluate: bool = True) -> DistillResult:
    out = Path(out)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun / accelerate launch only the main process checks
        probe_writable(out)
    from text3d.distill2d.data import load_prompts

    load_prompts(cfg.prompts_file)  # a bad prompts file fails before any folder is made
    trainer = _trainer(cfg, out, teacher, show_progress)
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    write_config(out, cfg)
    return _train(trainer, evaluate)


def resume_distill(out: Path, overrides: Sequence[str] = (), show_progress: bool = True, teacher=None,
                   evaluate: bool = True) -> DistillResult:
    from text3d.runtime.config import load_structured

    out = Path(out)
    if not (out / CONFIG_NAME).is_file():
        raise UserError(f"{out} is not a text3d distill2d folder (no {CONFIG_NAME})")
    if not (out / CHECKPOINT).is_file():
        raise UserError(f"{out} has no checkpoint to resume from ({CHECKPOINT})")
    cfg = load_structured(Distill2DConfig, [out / CONFIG_NAME], overrides)
    validate(cfg)
    trainer = _trainer(cfg, out, teacher, show_progress)
    trainer.load()
    write_config(out, cfg)
    return _train(trainer, evaluate)


def _trainer(cfg: Distill2DConfig, out: Path, teacher, show_progress: bool):
    if cfg.method in SCORE_METHODS:
        return Distill2DTrainer(cfg, out, teacher=teacher, show_progress=show_progress)
    from text3d.distill2d.trajectory import TrajectoryTrainer

    return TrajectoryTrainer(cfg, out, teacher=teacher, show_progress=show_progress)


def _train(trainer, evaluate: bool) -> DistillResult:
    if not isinstance(trainer, Distill2DTrainer):
        from text3d.distill2d.trajectory import run_trajectory

        return run_trajectory(trainer, evaluate)
    start = time.perf_counter()
    steps = trainer.fit()
    seconds = time.perf_counter() - start
    if not trainer.accelerator.is_main_process:
        return DistillResult(trainer.out, steps, seconds, trainer.out / STUDENT_DIR)
    trainer.preview(trainer.out / "samples" / "final.png")
    student = trainer.export()
    scores = evaluate_student(student, trainer.out / EVAL_DIR, trainer.prompts, show_progress=trainer.show_progress) \
        if evaluate else None
    summary = {"method": trainer.cfg.method, "steps": steps, "train_seconds_this_session": round(seconds, 2),
               "train_seconds_total": round(trainer.train_seconds, 2),
               "student_steps": trainer.counts["student_steps"], "fake_steps": trainer.counts["fake_steps"],
               "timesteps": list(trainer.cfg.timesteps), "teacher": str(trainer.teacher.source),
               "processes": trainer.accelerator.num_processes,
               "student": str(student), "scores": scores}
    atomic_write_text(trainer.out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return DistillResult(trainer.out, steps, seconds, student, scores)


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
