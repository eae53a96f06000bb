"""`text3d batch` as a library call: one generate run per prompt as a Ray task, on a local Ray runtime of N
workers or on an existing cluster (``address``).

Nothing is lost: a task whose worker dies is retried (Ray's ``max_retries``) and resumes its run from the last
periodic checkpoint; a rerun skips finished runs and resumes unfinished ones; one prompt's failure is recorded with
its one-line error while the others go on; Ctrl-C (or SIGTERM) passes the stop on to the running runs, which save a
checkpoint, and ends the batch with code 130. Ray runs offline here: no dashboard, no usage statistics.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from text3d.batch.plan import (DEFAULT_THREADS, check_counts, check_out_dir, default_workers, plan_items,
                               read_batch_prompts, run_state)
from text3d.batch.progress import BatchProgress
from text3d.batch.results import counts, previous_records, write_results
from text3d.batch.task import WORKERS_DIR, read_marker, run_files, run_prompt
from text3d.errors import UserError
from text3d.runtime.progress import format_seconds
from text3d.runtime.signals import Interrupted, StopRequest

RETRIES = 3  # attempts after a worker dies (its run resumes from its last checkpoint each time)
STOP_GRACE = 120.0  # seconds the runs get to save a checkpoint after Ctrl-C
POLL = 0.5  # seconds between two looks at the tasks (Ctrl-C is seen at once)
RAY_HINT = 'pip install -e ".[ray]"'


@dataclass
class BatchSettings:
    prompts_file: Path
    out: Path
    overrides: Sequence[str] = ()
    config_files: Sequence[Path] = ()
    guidance: str | None = None
    workers: int | None = None
    threads: int | None = None
    address: str | None = None
    video: bool = True
    score: bool = True


@dataclass
class BatchResult:
    out: Path
    records: list[dict]
    seconds: float
    counts: dict = field(default_factory=dict)


def import_ray(address: str | None = None):
    """``ray``, or a one-line error naming the extra that installs it. Joining a cluster (``address``) with the
    token of Ray's token authentication here (``~/.ray/auth_token``, what ``ray start --head`` makes, or
    ``$RAY_AUTH_TOKEN``), token mode is set before the import: ray 2.60 sends the token to ``auto`` by itself, not to
    ``HOST:PORT``."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline: no usage report, no prompt about it
    token = Path.home() / ".ray" / "auth_token"
    if address and "RAY_AUTH_MODE" not in os.environ and (token.is_file() or os.environ.get("RAY_AUTH_TOKEN")):
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise UserError(f"text3d batch needs Ray: {RAY_HINT}") from None
    return ray


def run_config(s: BatchSettings) -> list[str]:
    """The config files of the runs (``--config``, else the guidance preset); checks every override, the stages and
    the teacher's folder once, before anything starts (one-line errors)."""
    from text3d.generate.config import guidance_preset, load_config
    from text3d.teacher.loader import resolve_source

    files = [str(p) for p in s.config_files]
    if not files and s.guidance is not None:
        preset = guidance_preset(s.guidance)
        files = [str(preset)] if preset is not None else []
    cfg = load_config(files=files, overrides=s.overrides)
    resolve_source(cfg.teacher.name_or_path)  # a local folder: there, with every component (a hub id: not checked)
    return files


def ray_temp_dir() -> str:
    """A short folder for Ray's sockets (a Unix socket path must stay under 108 bytes)."""
    base = Path(tempfile.gettempdir())
    base = base if len(str(base)) <= 20 else Path("/tmp")
    return str(base / f"text3d-ray-{os.getuid()}")


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT that answers a TCP connection within ``timeout`` seconds (Ray itself keeps retrying for minutes);
    ``auto`` is Ray's to find."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        if address != "auto":
            raise UserError(f"--address must be auto or HOST:PORT, got {address!r}")
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address} ({exc.strerror or exc}); start it with "
                        f"ray start --head, or leave out --address for a local runtime") from None


def start_ray(ray, s: BatchSettings, threads: int) -> tuple[int, int]:
    """Start a local runtime (or join ``s.address``); (runs side by side, GPUs per run)."""
    common = dict(logging_level="ERROR", log_to_driver=False, configure_logging=True)
    if s.address:
        check_reachable(s.address)
        try:
            ray.init(address=s.address, **common)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"cannot join the Ray cluster at {s.address}: {' '.join(str(exc).split())[:200]}") from None
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        return s.workers or default_workers(int(resources.get("CPU", 1)), gpus, threads), 1 if gpus else 0
    import torch

    gpus = torch.cuda.device_count()
    workers = s.workers or default_workers(os.cpu_count() or 1, gpus, threads)
    ray.init(num_cpus=workers * threads, num_gpus=min(gpus, workers), include_dashboard=False,
             _temp_dir=ray_temp_dir(), **common)
    return workers, 1 if gpus else 0


def task_spec(s: BatchSettings, item, files: list[str], threads: int) -> dict:
    return {"prompt": item.prompt, "slug": item.slug, "out": str(Path(s.out).resolve()), "config_files": files,
            "overrides": list(s.overrides), "video": s.video, "score": s.score, "threads": threads}


def run_batch(s: BatchSettings, echo: Callable[[str], None] = print) -> BatchResult:
    """Run every prompt of ``s.prompts_file`` (see the module's docstring); the records, in prompt-file order."""
    check_counts(s.workers, s.threads)
    items = plan_items(read_batch_prompts(s.prompts_file))
    check_out_dir(s.out)
    files = run_config(s)
    ray = import_ray(s.address)
    threads = s.threads or (max(1, (os.cpu_count() or 1) // s.workers) if s.workers and not s.address
                            else DEFAULT_THREADS)
    out = Path(s.out)
    earlier = previous_records(out)
    records, todo = [], []
    for item in items:
        base = {"index": item.index, "prompt": item.prompt, "slug": item.slug}
        if run_state(out / item.slug, s.score) == "finished":
            old = earlier.get(item.slug, {})
            found = run_files(out, item.slug)
            keep = {k: old.get(k) for k in ("wall_seconds", "resumed_from", "attempts")}
            records.append({**base, **keep, **found, "status": "done", "skipped": True, "error": None})
        else:
            records.append({**base, "status": "waiting"})
            todo.append(item)
    begin = time.time()
    settings = {"prompts_file": str(s.prompts_file), "overrides": list(s.overrides), "threads": threads,
                "address": s.address, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not todo:
        write_results(out, records, {**settings, "workers": 0, "seconds": 0.0})
        return BatchResult(out, records, 0.0, counts(records))
    workers, gpus = start_ray(ray, s, threads)  # before the folder is made: a cluster that is not there leaves none
    settings["workers"] = workers
    try:
        (out / WORKERS_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        ray.shutdown()
        raise UserError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    for stale in (out / WORKERS_DIR).glob("*.json"):  # left by a batch that was killed: its workers are gone
        stale.unlink(missing_ok=True)
    try:
        remote = ray.remote(run_prompt).options(num_cpus=0 if gpus else threads, num_gpus=gpus,
                                                max_retries=RETRIES, retry_exceptions=False)
        _drive(ray, remote, s, todo, records, files, threads, workers, settings, begin, echo)
    finally:
        ray.shutdown()
    return BatchResult(out, records, time.time() - begin, counts(records))


def _drive(ray, remote, s, todo, records, files, threads, workers, settings, begin, echo) -> None:
    """Submit at most ``workers`` tasks at a time, collect them as they end, keep the results and the progress
    line current; on Ctrl-C pass the stop on to the running runs and raise Interrupted once they have saved."""
    out = Path(s.out)
    queue, pending = list(todo), {}
    progress = BatchProgress(len(records), workers, echo)
    with StopRequest() as stop:
        while queue or pending:
            while queue and len(pending) < workers and stop.signal is None:
                item = queue.pop(0)
                pending[remote.remote(task_spec(s, item, files, threads))] = item
                records[item.index]["status"] = "waiting"
            if stop.signal is not None:
                _stop_runs(ray, pending, out)
                _collect(ray, pending, records, out, timeout=STOP_GRACE)
                for item in queue:
                    records[item.index].update(status="waiting")
                write_results(out, records, {**settings, "seconds": round(time.time() - begin, 2)})
                raise Interrupted(f"batch stopped ({stop.signal}); the runs keep their checkpoints: rerun the same "
                                  f"command to continue ({out / 'results.csv'})")
            done = _collect(ray, pending, records, out, timeout=POLL)
            since = {}  # slug -> when its run's first attempt started
            for item in pending.values():
                marker = read_marker(out, item.slug)
                records[item.index]["status"] = "running" if marker else "waiting"
                if marker:
                    since[item.slug] = float(marker.get("started", time.time()))
            if done:
                write_results(out, records, {**settings, "seconds": round(time.time() - begin, 2)})
            progress.update(records, changed=bool(done), since=since)
    write_results(out, records, {**settings, "seconds": round(time.time() - begin, 2)})
    progress.update(records, changed=True, final=True)


def _collect(ray, pending: dict, records: list[dict], out: Path, timeout: float) -> list:
    """Records of the tasks that end within ``timeout`` seconds (a task whose retries ran out: failed)."""
    if not pending:
        return []
    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=timeout)
    for ref in ready:
        item = pending.pop(ref)
        try:
            record = ray.get(ref)
        except ray.exceptions.TaskCancelledError:  # stopped by Ctrl-C before it began
            record = {"status": "interrupted", "error": "stopped before it began"}
        except ray.exceptions.RayError as exc:
            reason = " ".join(str(exc).split())[:300]
            record = {"status": "failed", "error": f"its worker failed {RETRIES + 1} times: {reason}",
                      "attempts": RETRIES + 1}
        records[item.index] = {**records[item.index], **record, **run_files(out, item.slug),
                               "index": item.index, "skipped": False}
    return ready


def _stop_runs(ray, pending: dict, out: Path) -> None:
    """Ctrl-C for each running run: SIGINT to its worker on this machine (it saves a checkpoint and stops), Ray's
    cancel elsewhere; tasks not started yet are cancelled."""
    host = socket.gethostname()
    for ref, item in pending.items():
        marker = read_marker(out, item.slug)
        if marker.get("host") == host and marker.get("pid"):
            try:
                os.kill(int(marker["pid"]), signal.SIGINT)
                continue
            except (ProcessLookupError, PermissionError):
                pass
        ray.cancel(ref, force=False)


def describe(result: BatchResult) -> str:
    c = result.counts
    skipped = sum(bool(r.get("skipped")) for r in result.records)
    resumed = sum(r.get("resumed_from") is not None and not r.get("skipped") for r in result.records)
    return (f"batch: {c['done']} done ({skipped} already finished, {resumed} resumed), {c['failed']} failed in "
            f"{format_seconds(result.seconds)}; results in {result.out / 'results.csv'}, gallery "
            f"{result.out / 'index.html'}")


class BatchFailures(UserError):
    """Some prompts failed (the others finished): exit code 1."""

    exit_code = 1


def failures(result: BatchResult) -> list[str]:
    return [f"{r['prompt']!r}: {r.get('error')}" for r in result.records if r.get("status") == "failed"]
