"""The batch's progress line: done / running / failed / waiting, elapsed time and ETA, printed when a run ends and
every progress interval (``TEXT3D_PROGRESS_INTERVAL``, as for a run's own progress)."""

from __future__ import annotations

import time
from typing import Callable

from text3d.batch.results import counts
from text3d.runtime.progress import format_seconds, progress_interval


class BatchProgress:
    """One line for the batch as a whole: done / running / failed / waiting, elapsed and ETA (the mean wall time of
    the runs done in this call, spread over the workers); on each change, else every progress interval."""

    def __init__(self, total: int, workers: int, echo: Callable[[str], None]):
        self.total, self.workers, self.echo = total, workers, echo
        self.t0 = time.time()
        self.last = 0.0
        self.shown = ""
        self.interval = progress_interval()

    def eta(self, records: list[dict], since: dict[str, float] | None = None) -> float | None:
        """Seconds left: each waiting run takes the mean wall time of the runs done in this call, each running one
        what is left of it (``since``: when it started), spread over the workers; None before a run is done."""
        timed = [r["wall_seconds"] for r in records if r.get("status") == "done" and not r.get("skipped")
                 and r.get("wall_seconds")]
        waiting = sum(r.get("status") == "waiting" for r in records)
        running = [r for r in records if r.get("status") == "running"]
        if not waiting and not running:
            return 0.0
        if not timed:
            return None
        mean, now, since = sum(timed) / len(timed), time.time(), since or {}
        left = waiting * mean + sum(max(0.0, mean - (now - since.get(r["slug"], now))) for r in running)
        return left / min(self.workers, waiting + len(running))

    def line(self, records: list[dict], since: dict[str, float] | None = None) -> str:
        c = counts(records)
        return (f"[batch] {c['done']}/{self.total} done, {c['running']} running, {c['failed']} failed, "
                f"{c['waiting']} waiting; elapsed {format_seconds(time.time() - self.t0)} "
                f"ETA {format_seconds(self.eta(records, since))}")

    def update(self, records: list[dict], changed: bool, final: bool = False,
               since: dict[str, float] | None = None) -> None:
        """A line when ``changed`` (a run ended), at the end, or when the interval has passed since the last one;
        never the same counts twice in a row except on the interval."""
        now = time.time()
        line = self.line(records, since)
        counts_part = line.split(";")[0]
        due = now - self.last >= self.interval
        if due or ((changed or final) and counts_part != self.shown):
            self.last, self.shown = now, counts_part
            self.echo(line)
