"""Training curves: the per-step stats of a run kept in ``train_log.jsonl`` and drawn as ``curves.png``.

:class:`TrainLog` holds the records (``{"step": n, "loss": ..., ...}``, with a ``group`` key such as the 3D stage
or the 2D phase when a run has several) and rewrites the file atomically at each checkpoint, so the file and the
checkpoint agree: a resumed run drops the records after its checkpoint's step (those of a session killed after its
last checkpoint) and keeps every earlier point. :func:`plot_curves` draws loss, gradient norm, timestep and step
time against the step with matplotlib's Agg canvas (no display, no pyplot state: safe in a worker thread).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

from text3d.runtime.atomic import atomic_path, atomic_write_text

LOG_NAME = "train_log.jsonl"
CURVES_NAME = "curves.png"
# (title, the stats keys that hold it, first found wins)
PANELS = (("loss", ("loss",)), ("gradient norm", ("grad", "score_grad", "grad_norm")),
          ("timestep t", ("t",)), ("step time (s)", ("seconds",)))


def read_log(path: Path) -> list[dict]:
    """The records of a ``train_log.jsonl`` (an unreadable line, e.g. one cut by a crash, is skipped)."""
    records = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
                records.append(record)
    return records


class TrainLog:
    """The run's per-step stats. ``group`` (the 3D stage, the 2D phase; None for a single loop) tags each
    record; ``resume_step`` drops this group's records after that step (the checkpoint the run resumes from)."""

    def __init__(self, run_dir: Path, group: str | None = None, resume_step: int | None = None):
        self.path = Path(run_dir) / LOG_NAME
        self.group = group
        self.records = read_log(self.path)
        if resume_step is not None:
            self.records = [r for r in self.records if r.get("group") != group or r["step"] <= resume_step]

    def add(self, step: int, stats: dict) -> None:
        """Keep the finite numbers of ``stats`` for ``step``."""
        record: dict = {"step": int(step)}
        if self.group is not None:
            record["group"] = self.group
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                record[key] = round(float(value), 6)
        self.records.append(record)

    def flush(self) -> Path:
        """Rewrite ``train_log.jsonl`` atomically with every record."""
        return atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def plot(self, title: str = "") -> Path:
        """``curves.png`` beside the log, from every record."""
        return plot_curves(self.records, self.path.parent / CURVES_NAME, title)


def _series(records: Sequence[dict], keys: Iterable[str]) -> list[tuple[str | None, list[float], list[float]]]:
    """(group, x, y) for each group in order of first appearance, x continuing across groups (a stage's steps
    come after the steps of the stages before it)."""
    keys = tuple(keys)
    groups: dict = {}
    for r in records:
        groups.setdefault(r.get("group"), []).append(r)
    out, offset = [], 0
    for group, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["step"])
        key = next((k for k in keys if any(k in r for r in rows)), None)
        if key is not None:
            points = [(offset + r["step"], r[key]) for r in rows if key in r]
            out.append((group, [p[0] for p in points], [p[1] for p in points]))
        offset += max(r["step"] for r in rows)
    return out


def plot_curves(records: Sequence[dict], path: Path, title: str = "") -> Path:
    """Loss, gradient norm, timestep and step time against the step (one colour per group), as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2, sharex=True).flatten()
    for ax, (name, keys) in zip(axes, PANELS):
        series = _series(records, keys)
        for group, x, y in series:
            ax.plot(x, y, linewidth=0.8, label=group, marker="." if len(x) < 30 else None)
        if not series:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif name == "loss" and all(v > 0 for _, _, y in series for v in y):
            ax.set_yscale("log")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if any(group is not None for group, _, _ in series):
            ax.legend(fontsize=8)
    for ax in axes[2:]:
        ax.set_xlabel("step")
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
