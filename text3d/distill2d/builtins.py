"""text3d's own 2D distillation methods, registered through the entry points of its ``pyproject.toml`` (group
``text3d.distill2d``) exactly as a third-party package registers its own.

SwiftBrush, DMD and DMD2 are presets of the score trainer (:class:`~text3d.distill2d.trainer.Distill2DTrainer`,
run by :func:`~text3d.distill2d.run.run_score`); KD, PD and guided distillation are plans of the trajectory
trainer (:mod:`text3d.distill2d.trajectory`). Each method's preset is ``text3d/configs/distill2d/NAME.yaml``.
"""

from __future__ import annotations

from pathlib import Path

from text3d.distill2d.config import Distill2DMethod
from text3d.distill2d.run import run_score
from text3d.distill2d.trainer import Distill2DTrainer
from text3d.distill2d.trajectory import TrajectoryTrainer, run_trajectory
from text3d.runtime.resources import CONFIG_DIR


def _preset(name: str) -> Path:
    return CONFIG_DIR / "distill2d" / f"{name}.yaml"


swiftbrush = Distill2DMethod(build=Distill2DTrainer, run=run_score, preset=_preset("swiftbrush"))
dmd = Distill2DMethod(build=Distill2DTrainer, run=run_score, preset=_preset("dmd"))
dmd2 = Distill2DMethod(build=Distill2DTrainer, run=run_score, preset=_preset("dmd2"))
kd = Distill2DMethod(build=TrajectoryTrainer, run=run_trajectory, preset=_preset("kd"))
pd = Distill2DMethod(build=TrajectoryTrainer, run=run_trajectory, preset=_preset("pd"))
guided = Distill2DMethod(build=TrajectoryTrainer, run=run_trajectory, preset=_preset("guided"))
