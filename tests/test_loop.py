"""The training-loop helper (text3d.runtime.loop) on a toy step function: stop requests, NaN policy,
checkpoint cadence, progress and periodic callbacks, time budget."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest

from text3d.errors import NumericalError
from text3d.runtime.loop import NonFiniteSteps, TrainingLoop
from text3d.runtime.signals import Interrupted, StopRequest


class Toy:
    """A 'model' whose step adds the step's value to a running sum, skipping non-finite values."""

    def __init__(self, values=None, limit: int = 3):
        self.values = values or {}
        self.total, self.done, self.saved = 0.0, [], []
        self.nonfinite = NonFiniteSteps(limit, Path("ckpt/last.pt"), "try a lower lr")

    def step(self, step: int) -> dict:
        self.done.append(step)
        value = self.values.get(step, 1.0)
        if not math.isfinite(value):
            self.nonfinite.skip("toy loss", step)
            return {"loss": value, "skipped": 1.0}
        self.total += value
        return {"loss": value}

    def save(self) -> Path:
        self.saved.append(self.done[-1] if self.done else 0)
        return Path("ckpt/last.pt")


def loop(toy: Toy, total: int = 10, **kwargs) -> TrainingLoop:
    return TrainingLoop(total, kwargs.pop("start", 0), description="toy", show_progress=False, save=toy.save,
                        nonfinite=toy.nonfinite, **kwargs)


def test_stop_request_saves_a_checkpoint_then_raises_interrupted():
    toy = Toy()
    stop = StopRequest()

    def press_ctrl_c(step, stats):
        if step == 3:
            stop.signal = "SIGINT"  # what the handler does on the first Ctrl-C

    with pytest.raises(Interrupted) as excinfo:
        loop(toy, checkpoint_every=5, every=[(1, press_ctrl_c)], stop=stop, where=" in phase a",
             resume="text3d x --resume run").run(toy.step)
    assert toy.done == [1, 2, 3] and toy.saved == [3]
    assert excinfo.value.exit_code == 130
    assert str(excinfo.value) == ("stopped by SIGINT in phase a after step 3; checkpoint saved to ckpt/last.pt; "
                                  "continue with: text3d x --resume run")


def test_a_real_sigint_stops_after_the_current_step_and_handlers_are_restored():
    toy = Toy()
    before = signal.getsignal(signal.SIGINT)

    def step(i):
        if i == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return toy.step(i)

    with pytest.raises(Interrupted, match="stopped by SIGINT after step 2"):
        loop(toy, checkpoint_every=100).run(step)
    assert toy.done == [1, 2] and toy.saved == [2]
    assert signal.getsignal(signal.SIGINT) is before


def test_a_stop_before_the_first_step_runs_nothing():
    toy = Toy()
    stop = StopRequest()
    stop.signal = "SIGTERM"
    with pytest.raises(Interrupted, match="before step 5"):
        loop(toy, start=4, stop=stop).run(toy.step)
    assert toy.done == [] and toy.saved == []


def test_consecutive_non_finite_steps_raise_naming_the_last_checkpoint():
    toy = Toy({s: float("nan") for s in range(4, 11)}, limit=3)
    with pytest.raises(NumericalError) as excinfo:
        loop(toy, checkpoint_every=2).run(toy.step)
    assert toy.done == [1, 2, 3, 4, 5, 6]  # steps 4, 5, 6 are NaN: the third one stops the run
    assert toy.saved == [2, 4]
    assert toy.total == 3.0  # no NaN reached the 'parameters'
    message = str(excinfo.value)
    assert "\n" not in message and "3 consecutive steps (at step 6)" in message
    assert "ckpt/last.pt" in message and "try a lower lr" in message


def test_a_finite_step_resets_the_count():
    nan = float("nan")
    toy = Toy({1: nan, 2: nan, 4: nan, 5: nan, 7: nan, 8: nan}, limit=3)
    loop(toy).run(toy.step)  # never 3 in a row
    assert toy.done == list(range(1, 11)) and toy.total == 4.0
    assert toy.nonfinite.count == 0


def test_several_skips_in_one_step_count_once():
    guard = NonFiniteSteps(2)
    guard.skip("student loss", 1)
    guard.skip("fake-score loss", 1)
    assert guard.count == 1
    with pytest.raises(NumericalError, match="no checkpoint was saved"):
        guard.skip("student loss", 2)


@pytest.mark.parametrize("start, every, save_last, expected", [
    (0, 4, True, [4, 8, 10]),
    (5, 4, True, [8, 10]),  # a resumed run keeps the cadence of the step count
    (0, 4, False, [4, 8]),
    (0, 0, True, [10]),
])
def test_checkpoint_cadence(start, every, save_last, expected):
    toy = Toy()
    last = loop(toy, start=start, checkpoint_every=every, save_last=save_last).run(toy.step)
    assert last == 10 and toy.done == list(range(start + 1, 11))
    assert toy.saved == expected


def test_progress_log_and_periodic_callbacks_keep_their_cadence_and_order():
    toy = Toy()
    events = []
    loop(toy, checkpoint_every=5, log_every=3,
         log=lambda step, stats: events.append(("log", step)),
         every=[(5, lambda step, stats: events.append(("preview", step))),
                (0, lambda step, stats: events.append(("never", step)))]).run(toy.step)
    assert events == [("log", 3), ("preview", 5), ("log", 6), ("log", 9), ("log", 10), ("preview", 10)]
    assert toy.saved == [5, 10]


def test_time_budget_stops_early_with_a_checkpoint():
    toy = Toy()
    lp = loop(toy, checkpoint_every=100, budget_s=0.0)
    assert lp.run(toy.step) == 1
    assert lp.stopped_early and toy.done == [1] and toy.saved == [1]
    toy = Toy()
    lp = loop(toy, total=1, budget_s=0.0)  # the last step is never 'early'
    assert lp.run(toy.step) == 1 and not lp.stopped_early and toy.saved == [1]
