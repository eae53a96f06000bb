"""The one training-loop helper: every text3d training loop (3D generation, 2D distillation, trajectory
distillation, teacher training, the judge) runs its steps through :class:`TrainingLoop`.

The contract. A loop owns its state and supplies ``step_fn(step) -> stats``: it performs step ``step``
(counted from 1) and returns a dict of floats. :meth:`TrainingLoop.run` calls it for ``start + 1 ..
total`` and after each step, in this order:

1. NaN policy: a step whose loss or gradient is NaN/inf makes no update, calls ``nonfinite.skip(what,
   step)`` itself (:class:`NonFiniteSteps` raises NumericalError at its limit) and returns stats with
   ``skipped``; the loop resets the count after every step without ``skipped``.
2. progress: every ``log_every`` steps and at the last, LoopProgress shows ``show(stats)`` and
   ``log(step, stats)`` is called; every other step only advances the display (its rate and ETA).
3. checkpoint: ``save()`` every ``checkpoint_every`` steps, at the last step (unless ``save_last`` is
   False) and when the time budget ends the loop.
4. periodic callbacks: for each ``(n, fn)`` of ``every``, ``fn(step, stats)`` every ``n`` steps (n <= 0:
   never).
5. stop: after a Ctrl-C/SIGTERM (:class:`~text3d.runtime.signals.StopRequest`) ``save()`` and raise
   :class:`~text3d.runtime.signals.Interrupted`, saying how to continue.
6. time budget: stop early, returning, when the next step would overrun ``budget_s`` seconds.

The loop draws no random numbers and does no arithmetic on the model: a run computes exactly what its
step function computes, whatever the loop's settings.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterable

from text3d.errors import NumericalError
from text3d.runtime.progress import LoopProgress
from text3d.runtime.signals import Interrupted, StopRequest

Stats = dict


class NonFiniteSteps:
    """The NaN policy: ``limit`` consecutive non-finite steps raise NumericalError, in one line naming the
    last good checkpoint. Steps call :meth:`skip` (several calls in one step count once); the loop calls
    :meth:`reset` after a finite step."""

    def __init__(self, limit: int, checkpoint: str | Path | None = None, hint: str = ""):
        self.limit, self.checkpoint, self.hint = limit, checkpoint, hint
        self.count, self._last_step = 0, None

    def skip(self, what: str, step: int) -> None:
        if step != self._last_step:
            self.count, self._last_step = self.count + 1, step
        if self.count >= self.limit:
            where = (f"the last good checkpoint is {self.checkpoint}" if self.checkpoint is not None
                     else "no checkpoint was saved")
            raise NumericalError(f"the {what} was NaN/inf for {self.count} consecutive step"
                                 f"{'s' if self.count != 1 else ''} (at step {step}); {where}"
                                 + (f"; {self.hint}" if self.hint else ""))

    def reset(self) -> None:
        self.count, self._last_step = 0, None


class TrainingLoop:
    """Steps ``start + 1 .. total`` of ``step_fn`` with progress, checkpoints, callbacks, NaN policy and
    Ctrl-C (see the module's docstring). ``stop``: a StopRequest the caller has installed (default: one
    installed for this run); ``where`` (" in phase pd_2") and ``resume`` (the command that continues)
    go into the Interrupted message."""

    def __init__(self, total: int, start: int = 0, *, description: str, show_progress: bool = True,
                 save: Callable[[], Path] | None = None, checkpoint_every: int = 0, save_last: bool = True,
                 log_every: int = 1, show: Callable[[Stats], Stats] | None = None,
                 log: Callable[[int, Stats], None] | None = None,
                 every: Iterable[tuple[int, Callable[[int, Stats], None]]] = (),
                 nonfinite: NonFiniteSteps | None = None, stop: StopRequest | None = None,
                 where: str = "", resume: str = "", budget_s: float | None = None):
        self.total, self.start, self.description, self.show_progress = total, start, description, show_progress
        self.save, self.checkpoint_every, self.save_last = save, checkpoint_every, save_last
        self.log_every, self.show, self.log, self.every = log_every, show or dict, log, list(every)
        self.nonfinite, self.stop, self.where, self.resume, self.budget_s = nonfinite, stop, where, resume, budget_s
        self.stopped_early = False  # the last run() ended at the time budget
        self.progress: LoopProgress | None = None  # the display, while run() runs

    def message(self, text: str) -> None:
        """A line of text through the progress display (from a callback during :meth:`run`)."""
        if self.progress is not None:
            self.progress.log(text)

    def _interrupted(self, signal: str, when: str, path: Path | None) -> Interrupted:
        saved = f"; checkpoint saved to {path}" if path is not None else ""
        resume = f"; continue with: {self.resume}" if self.resume else ""
        return Interrupted(f"stopped by {signal}{self.where} {when}{saved}{resume}")

    def run(self, step_fn: Callable[[int], Stats]) -> int:
        """Run the steps; returns the last completed step."""
        self.stopped_early = False
        step = self.start
        if self.stop is not None and self.stop.signal is not None:  # a signal before the first step
            raise self._interrupted(self.stop.signal, f"before step {step + 1}", None)
        installed = contextlib.nullcontext(self.stop) if self.stop is not None else StopRequest()
        t0 = time.perf_counter()
        with installed as stop, LoopProgress(self.total, self.start, self.description, self.show_progress) as bar:
            self.progress = bar
            for step in range(self.start + 1, self.total + 1):
                stats = step_fn(step)
                elapsed = time.perf_counter() - t0
                if self.nonfinite is not None and not stats.get("skipped"):
                    self.nonfinite.reset()
                last = step == self.total
                self.stopped_early = early = (not last and stop.signal is None and self.budget_s is not None
                                              and elapsed + elapsed / (step - self.start) > self.budget_s)
                if step % self.log_every == 0 or last:
                    bar.update(step, self.show(stats))
                    if self.log is not None:
                        self.log(step, stats)
                else:
                    bar.update(step)  # the rate and ETA from every step; the stats stay
                if self.save is not None and ((self.checkpoint_every > 0 and step % self.checkpoint_every == 0)
                                              or (last and self.save_last) or early):
                    self.save()
                for n, fn in self.every:
                    if n > 0 and step % n == 0:
                        fn(step, stats)
                if stop.signal is not None:
                    path = self.save() if self.save is not None else None
                    raise self._interrupted(stop.signal, f"after step {step}", path)
                if early:
                    break
        return step
