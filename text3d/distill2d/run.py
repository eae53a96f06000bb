"""`text3d distill2d` as library calls: a new run or a resumed one, then the saved student and, for
embedded-world prompts, the judge's scores of its samples."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Sequence

from text3d.distill2d.config import DISTILL2D_REGISTRY, Distill2DConfig, distill_config_schema, validate
from text3d.distill2d.processes import end_processes, replica_fingerprints
from text3d.distill2d.results import EVAL_DIR, SUMMARY, DistillResult, evaluate_student
from text3d.distill2d.trainer import CHECKPOINT, CONFIG_NAME, STUDENT_DIR, Distill2DTrainer, write_config
from text3d.errors import UserError
from text3d.runtime.run_folder import probe_writable
from text3d.runtime.atomic import atomic_write_text
from text3d.report.page import write_run_page

__all__ = ["EVAL_DIR", "SUMMARY", "DistillResult", "distill", "evaluate_student", "resume_distill"]


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
    cfg = load_structured(distill_config_schema(), [out / CONFIG_NAME], overrides)
    validate(cfg)
    trainer = _trainer(cfg, out, teacher, show_progress)
    trainer.load()
    write_config(out, cfg)
    return _train(trainer, evaluate)


def _trainer(cfg: Distill2DConfig, out: Path, teacher, show_progress: bool):
    """The trainer of the method registered as ``cfg.method``."""
    return DISTILL2D_REGISTRY.get(cfg.method).build(cfg, out, teacher=teacher, show_progress=show_progress)


def _train(trainer, evaluate: bool) -> DistillResult:
    """Train with the run function of the trainer's method (:func:`run_score` or ``run_trajectory``), then close
    the processes of a multi-process launch together."""
    result = DISTILL2D_REGISTRY.get(trainer.cfg.method).run(trainer, evaluate)
    end_processes(trainer.accelerator)
    return result


def run_score(trainer: Distill2DTrainer, evaluate: bool) -> DistillResult:
    """A score method's run (SwiftBrush, DMD, DMD2): train, then preview, export and score the student."""
    start = time.perf_counter()
    steps = trainer.fit()
    seconds = time.perf_counter() - start
    replicas = None
    if trainer.accelerator.num_processes > 1:  # every process: are the students (and fake scores) still identical?
        replicas = replica_fingerprints(trainer.accelerator, {"student": trainer._student_unet().state_dict(),
                                                              "fake": trainer.fake.lora_state_dict()}, trainer.counts)
    if not trainer.accelerator.is_main_process:
        return DistillResult(trainer.out, steps, seconds, trainer.out / STUDENT_DIR)
    trainer.preview(trainer.out / "samples" / "final.png")
    student = trainer.export()
    scores = evaluate_student(student, trainer.out / EVAL_DIR, trainer.prompts, show_progress=trainer.show_progress) \
        if evaluate and not getattr(trainer, "lean", False) else None  # lean: no judge (config.apply_lean)
    summary = {"method": trainer.cfg.method, "steps": steps, "train_seconds_this_session": round(seconds, 2),
               "train_seconds_total": round(trainer.train_seconds, 2),
               "student_steps": trainer.counts["student_steps"], "fake_steps": trainer.counts["fake_steps"],
               "timesteps": list(trainer.cfg.timesteps), "teacher": str(trainer.teacher.source),
               "processes": trainer.accelerator.num_processes, "replicas": replicas,
               "student": str(student), "scores": scores}
    atomic_write_text(trainer.out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    write_run_page(trainer.out, f"distill2d {trainer.cfg.method}")  # index.html: samples, curves, scores
    return DistillResult(trainer.out, steps, seconds, student, scores)

