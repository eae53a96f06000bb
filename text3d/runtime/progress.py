"""A progress display for long loops: a rich bar with the loop's stats, it/s and ETA on a terminal; a plain
line every ``interval`` seconds otherwise (CI, a pipe, ``nohup``, a batch job), with the steps, it/s and ETA.

The rate and the ETA are the display's own, measured from the times of its updates: the steps done since
the first update (the first step, which often loads or caches something, does not count) over a window of
the last :data:`RATE_WINDOW` seconds that always holds at least two updates. Rich's TimeRemainingColumn
is not used: it estimates the speed only from the updates of the last 30 s (``speed_estimate_period``),
so a loop that reports every 10 steps of a few seconds each gives it at most one update in its window and
it shows ``-:--:--`` for the whole run.

Off a terminal the first line comes after :data:`FIRST_LINE_STEPS` steps (or after ``interval`` seconds if
those are slower), then one at the first update after each further ``interval`` seconds (so one a step when
steps are slower than that), and one at the last step. ``interval`` defaults to
the environment variable ``TEXT3D_PROGRESS_INTERVAL``, else :data:`DEFAULT_INTERVAL`.
"""

from __future__ import annotations

import collections
import os
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from text3d.errors import ConfigError

INTERVAL_ENV = "TEXT3D_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0  # seconds between two plain progress lines
FIRST_LINE_STEPS = 3  # the first plain line comes after this many steps
RATE_WINDOW = 60.0  # seconds of updates the rate is measured over


def progress_interval(interval: float | None = None) -> float:
    """Seconds between two plain progress lines: ``interval``, else ``$TEXT3D_PROGRESS_INTERVAL``, else 10."""
    if interval is None:
        value = os.environ.get(INTERVAL_ENV, "").strip()
        if not value:
            return DEFAULT_INTERVAL
        try:
            interval = float(value)
        except ValueError:
            raise ConfigError(f"{INTERVAL_ENV} must be a number of seconds, got {value!r}") from None
    if not interval > 0:
        raise ConfigError(f"the progress interval must be > 0 seconds, got {interval}")
    return float(interval)


def format_seconds(seconds: float | None) -> str:
    """H:MM:SS, or -:--:-- when not known."""
    if seconds is None:
        return "-:--:--"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class _RemainingColumn(ProgressColumn):
    """LoopProgress's ETA, counting down between its updates."""

    def render(self, task) -> Text:
        deadline = task.fields.get("deadline")
        remaining = 0.0 if task.finished else None if deadline is None else max(0.0, deadline - time.perf_counter())
        return Text(format_seconds(remaining), style="progress.remaining")


class LoopProgress:
    """Progress of steps ``start + 1 .. total``; :meth:`update` after a step (every step keeps the ETA fresh;
    ``stats`` may come less often), :meth:`log` for a line of text. ``interval``: seconds between the plain
    lines off a terminal (see the module's docstring)."""

    def __init__(self, total: int, start: int = 0, description: str = "optimising", enabled: bool = True,
                 console: Console | None = None, interval: float | None = None):
        self.total, self.start, self.description = total, start, description
        self.console = console or Console(stderr=True)
        self.interactive = enabled and self.console.is_terminal
        self.enabled = enabled
        self.interval = progress_interval(interval)
        self.t0 = time.perf_counter()
        self.samples: collections.deque[tuple[float, int]] = collections.deque()  # (time, step) of the updates
        self.stats = ""
        self.last_line: tuple[float, int] | None = None  # (time, step) of the last plain line
        self.progress = None
        if self.interactive:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TextColumn("{task.fields[rate]}"),
                                     TimeElapsedColumn(), TextColumn("ETA"), _RemainingColumn(),
                                     console=self.console, transient=False)
            self.task = self.progress.add_task(description, total=total, completed=start, stats="", rate="",
                                               deadline=None)

    def __enter__(self) -> "LoopProgress":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def rate(self) -> float | None:
        """Steps per second over the last :data:`RATE_WINDOW` seconds of updates (at least two of them); after
        the first update, the steps so far over the time since the display was made; None before."""
        if len(self.samples) >= 2:
            (t_first, first), (t_last, last) = self.samples[0], self.samples[-1]
            return (last - first) / max(1e-9, t_last - t_first)
        if self.samples:
            t_last, last = self.samples[-1]
            return (last - self.start) / max(1e-9, t_last - self.t0)
        return None

    def eta(self, step: int) -> float | None:
        """Seconds left after ``step`` at the measured rate (None while not known)."""
        rate = self.rate()
        if step >= self.total:
            return 0.0
        return (self.total - step) / rate if rate else None

    def _record(self, step: int, now: float) -> None:
        if self.samples and step <= self.samples[-1][1]:
            return
        self.samples.append((now, step))
        while len(self.samples) > 2 and self.samples[1][0] <= now - RATE_WINDOW:
            self.samples.popleft()

    def _line_due(self, step: int, now: float) -> bool:
        if self.last_line is None:
            return step >= self.total or step - self.start >= FIRST_LINE_STEPS or now - self.t0 >= self.interval
        return step > self.last_line[1] and (step >= self.total or now - self.last_line[0] >= self.interval)

    def line(self, step: int, now: float | None = None) -> str:
        """The plain progress line after ``step``."""
        now = time.perf_counter() if now is None else now
        rate = self.rate()
        percent = 100.0 * step / self.total if self.total > 0 else 100.0
        return " ".join(part for part in (
            f"[{self.description}] step {step}/{self.total} ({percent:.0f}%)", self.stats,
            f"{rate:.3g} it/s" if rate else "? it/s", f"elapsed {format_seconds(now - self.t0)}",
            f"ETA {format_seconds(self.eta(step))}") if part)

    def update(self, step: int, stats: dict[str, float] | None = None) -> None:
        """Step ``step`` is done; ``stats`` are shown from now on (None: the last ones stay)."""
        now = time.perf_counter()
        if stats is not None:
            self.stats = " ".join(f"{k}={v:.4g}" for k, v in stats.items())
        self._record(step, now)
        if self.progress is not None:
            rate, eta = self.rate(), self.eta(step)
            self.progress.update(self.task, completed=step, stats=self.stats,
                                 rate=f"{rate:.2f} it/s" if rate else "", deadline=None if eta is None else now + eta)
        elif self.enabled and self._line_due(step, now):
            self.last_line = (now, step)
            file = self.console.file
            file.write(self.line(step, now) + "\n")
            file.flush()

    def log(self, message: str) -> None:
        """A line of text above the bar (plain text: not wrapped, brackets kept)."""
        if self.enabled:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)
