"""A progress display for long loops: a rich bar with loss, it/s and ETA on a terminal,
periodic one-line logs otherwise (CI, pipes)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class LoopProgress:
    def __init__(self, total: int, start: int = 0, description: str = "optimising", enabled: bool = True,
                 console: Console | None = None, log_fraction: float = 0.1):
        self.total, self.start, self.description = total, start, description
        self.console = console or Console(stderr=True)
        self.interactive = enabled and self.console.is_terminal
        self.enabled = enabled
        self.log_every = max(1, int((total - start) * log_fraction))
        self.t0 = time.perf_counter()
        self.progress = None
        if self.interactive:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TextColumn("{task.fields[rate]}"),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                     console=self.console, transient=False)
            self.task = self.progress.add_task(description, total=total, completed=start, stats="", rate="")

    def __enter__(self) -> "LoopProgress":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def rate(self, step: int) -> float:
        done = step - self.start
        return done / max(1e-9, time.perf_counter() - self.t0)

    def update(self, step: int, stats: dict[str, float]) -> None:
        text = " ".join(f"{k}={v:.4g}" for k, v in stats.items())
        rate = self.rate(step)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, stats=text, rate=f"{rate:.2f} it/s")
        elif self.enabled and ((step - self.start) % self.log_every == 0 or step == self.total):
            eta = (self.total - step) / max(rate, 1e-9)
            print(f"[{self.description}] step {step}/{self.total} {text} {rate:.2f} it/s ETA {eta:.0f}s",
                  file=sys.stderr, flush=True)

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)
