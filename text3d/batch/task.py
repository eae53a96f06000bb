"""One prompt of a batch, as it runs inside a Ray worker: start, resume or skip its run folder, score it when the
prompt belongs to the embedded world, and return its record (a plain dict; errors become the record's one line).

While it runs, ``DIR/.workers/<slug>.json`` names the worker (host, pid) and counts the attempts: a worker that
dies leaves it behind, so the retry knows it is a retry and when the first attempt started; the batch driver
reads it to show what runs and to pass Ctrl-C on to the workers on its own machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
import warnings
from pathlib import Path

from text3d.batch.plan import EVAL_NAME, run_state
from text3d.errors import UserError
from text3d.runtime.atomic import atomic_write_text
from text3d.runtime.run_folder import CONFIG_NAME, SUMMARY_NAME

WORKERS_DIR = ".workers"
SCORE_KEYS = ("object_accuracy", "colour_accuracy", "view_accuracy", "silhouette_iou", "volume_iou", "top_iou",
              "janus_rate")
LEFTOVERS = (CONFIG_NAME, "cli.json", "checkpoints", "previews", "train_log.jsonl")  # of a run killed before its
# first checkpoint: removed, and the run starts again


def marker_path(out: Path, slug: str) -> Path:
    return Path(out) / WORKERS_DIR / f"{slug}.json"


def read_marker(out: Path, slug: str) -> dict:
    try:
        return json.loads(marker_path(out, slug).read_text())
    except (OSError, ValueError):
        return {}


def run_prompt(spec: dict) -> dict:
    """Run ``spec`` (prompt, slug, out, config_files, overrides, video, score, threads; see runner.task_spec) and
    return its record. Never raises for a failure of the run itself: the record says ``failed`` with the error."""
    out, slug = Path(spec["out"]), spec["slug"]
    previous = read_marker(out, slug)
    started = float(previous.get("started", time.time()))
    attempt = int(previous.get("attempt", 0)) + 1
    atomic_write_text(marker_path(out, slug), json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                          "attempt": attempt, "started": started}))
    record = {"prompt": spec["prompt"], "slug": slug, "attempts": attempt, "resumed_from": None, "error": None}
    # Ray's workers block SIGINT; the driver's Ctrl-C reaches a run as SIGINT to its worker, so let it in (the
    # training loop then saves a checkpoint and stops; elsewhere it is a KeyboardInterrupt)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record.update(_run(spec, out / slug))
        record["warnings"] = "; ".join(dict.fromkeys(str(w.message) for w in caught
                                                     if issubclass(w.category, UserWarning))) or None
        record["status"] = "done"
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, or ray.cancel of a task on another machine
        record.update(status="interrupted", error="stopped; rerun the batch to continue from its last checkpoint")
    except UserError as exc:  # bad prompt, NaN, Ctrl-C passed on by the driver (Interrupted), ...
        record.update(status="interrupted" if exc.exit_code == 130 else "failed", error=_one_line(str(exc)))
    except Exception as exc:  # a bug: still one line, the others go on
        record.update(status="failed", error=f"internal error: {type(exc).__name__}: {_one_line(str(exc))}")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        marker_path(out, slug).unlink(missing_ok=True)
    record["wall_seconds"] = round(time.time() - started, 2)
    return record


def _one_line(text: str) -> str:
    return " ".join(text.split())[:500]


def _run(spec: dict, run_dir: Path) -> dict:
    import torch

    torch.set_num_threads(int(spec["threads"]))
    state = run_state(run_dir, spec["score"])
    result = {}
    if state == "unfinished":
        from text3d.generate.run import resume

        result["resumed_from"] = checkpoint_step(run_dir)
        resume(run_dir, show_progress=False)
    elif state == "new":
        from text3d.generate.config import load_config
        from text3d.generate.run import generate

        cfg = load_config(files=spec["config_files"], overrides=spec["overrides"])
        cfg.prompt = spec["prompt"]
        _clear_unstarted(run_dir)
        generate(cfg, out=run_dir, show_progress=False, video=spec["video"])
    if spec["score"] and not (run_dir / EVAL_NAME).is_file() and _world_prompt(run_dir):
        from text3d.eval.score_run import score_run

        score_run(run_dir)
    return result


def checkpoint_step(run_dir: Path) -> int:
    """The steps a run's checkpoints hold (summed over its stages): where its resume starts."""
    from text3d.runtime.checkpoint import load_checkpoint

    return sum(int(load_checkpoint(path).get("step", 0)) for path in sorted((run_dir / "checkpoints").glob("*.pt"))
               if not path.name.startswith("."))


def _clear_unstarted(run_dir: Path) -> None:
    """Remove what a run killed before its first checkpoint left (nothing to resume from)."""
    for name in LEFTOVERS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _world_prompt(run_dir: Path) -> bool:
    """Whether the run's prompt is an embedded-world caption, which the judge can score."""
    from text3d.toyworld.catalog import parse_caption

    return parse_caption(json.loads((run_dir / SUMMARY_NAME).read_text())["prompt"]) is not None


def run_files(out: Path, slug: str) -> dict:
    """What a finished run wrote (from its ``run.json``; paths relative to the batch folder), its run page when
    there is one, its steps and its judge scores (``eval.json``)."""
    run_dir = Path(out) / slug
    try:
        summary = json.loads((run_dir / SUMMARY_NAME).read_text())
    except (OSError, ValueError):
        return {}
    files = {k: f"{slug}/{v}" for k, v in summary.get("files", {}).items() if isinstance(v, str)}
    if (run_dir / "index.html").is_file():
        files["page"] = f"{slug}/index.html"
    scores = {}
    if (run_dir / EVAL_NAME).is_file():
        try:
            found = json.loads((run_dir / EVAL_NAME).read_text())
            scores = {k: found.get(k) for k in SCORE_KEYS}
        except (OSError, ValueError):
            pass
    return {"steps": summary.get("steps"), "files": files, "scores": scores}
