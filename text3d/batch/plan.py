"""What a batch will do, decided before anything starts: the prompts of the prompt file, each one's run folder
``DIR/<slug>``, the state that folder is in (new, unfinished, finished), and how many runs go side by side.

Torch-free, so bad input (a missing or empty prompt file, a bad ``--workers``) is refused at once.

The prompt file holds one prompt a line; blank lines and lines starting with ``#`` are skipped, and a line in
double quotes is read as a JSON string (``""`` is the empty prompt, which fails like ``text3d generate ""``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from text3d.errors import UserError
from text3d.prompts import prompt_file_lines
from text3d.runtime.run_folder import CONFIG_NAME, SUMMARY_NAME, slugify

EVAL_NAME = "eval.json"  # text3d.eval.score_run.EVAL_NAME, named here so planning stays torch-free
DEFAULT_THREADS = 1  # torch threads a CPU run gets by default (see docs/batch.md: 2 runs of 1 thread beat 1 of 2)


@dataclass
class Item:
    """One line of the prompt file and its run folder."""

    index: int
    prompt: str
    slug: str


def read_batch_prompts(path: Path) -> list[str]:
    """The prompts of ``path`` in order (see the module's docstring); one-line errors for a missing, unreadable or
    empty file. Prompts are not validated here: a bad one fails in its own run and is reported there."""
    path = Path(path)
    lines = prompt_file_lines(path)
    prompts = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if len(text) >= 2 and text[0] == text[-1] == '"':
            try:
                text = json.loads(text)
            except json.JSONDecodeError:
                raise UserError(f"prompts file {path}, line {number}: bad quoted prompt {line.strip()}") from None
        prompts.append(text)
    if not prompts:
        raise UserError(f"prompts file {path} has no prompts (one prompt per line)")
    return prompts


def plan_items(prompts: list[str]) -> list[Item]:
    """Each prompt with its folder name: the prompt's slug, ``-2``, ``-3``... for repeats, so the same file always
    maps the same prompt to the same folder (a rerun finds its runs)."""
    items, seen = [], {}
    for index, prompt in enumerate(prompts):
        base = slugify(" ".join(prompt.split())) if prompt.strip() else "empty-prompt"
        seen[base] = seen.get(base, 0) + 1
        items.append(Item(index, prompt, base if seen[base] == 1 else f"{base}-{seen[base]}"))
    return items


def run_state(run_dir: Path, scored: bool) -> str:
    """``new`` (no folder, or one with nothing to resume), ``unfinished`` (a checkpoint to resume from),
    ``finished`` (its ``run.json`` written, and ``eval.json`` too when ``scored``), or ``unscored`` (finished but
    not yet scored)."""
    run_dir = Path(run_dir)
    if (run_dir / SUMMARY_NAME).is_file():
        return "unscored" if scored and not (run_dir / EVAL_NAME).is_file() else "finished"
    checkpoints = run_dir / "checkpoints"
    if (run_dir / CONFIG_NAME).is_file() and checkpoints.is_dir() and any(checkpoints.glob("*.pt")):
        return "unfinished"
    return "new"


def check_out_dir(out: Path) -> None:
    """``out`` is a folder (or can become one); one line otherwise. Creates nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} exists and is not a folder")
    anchor = out
    while not anchor.exists():
        anchor = anchor.parent
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to output folder {out}: permission denied")


def default_workers(cpus: int, gpus: int, threads: int) -> int:
    """Runs side by side on one machine: one per GPU, else as many runs of ``threads`` threads as the cores hold."""
    if gpus > 0:
        return gpus
    return max(1, cpus // max(1, threads))


def check_counts(workers: int | None, threads: int | None) -> None:
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
