"""Ctrl-C / SIGTERM as a request to stop after the current step (a second Ctrl-C stops at once)."""

from __future__ import annotations

import signal
import threading

from text3d.errors import UserError


class Interrupted(UserError):
    """Ctrl-C or SIGTERM: the run stopped after a checkpoint was saved."""

    exit_code = 130


class StopRequest:
    """``with StopRequest() as stop:`` ... ``if stop.signal: save and raise Interrupted``."""

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
