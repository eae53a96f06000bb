"""Timestep schedules for score distillation: t ~ U[t_min, t_max] * T, with t_max optionally annealed.

DreamFusion samples t uniformly in [0.02, 0.98]; later work (ProlificDreamer, threestudio)
anneals the upper end so that late steps refine detail at low noise. Fractions of the run are
used throughout, so a schedule does not depend on the total number of steps.
"""

from __future__ import annotations

import math

import torch


def anneal_fraction(progress: float, start: float) -> float:
    """How far an annealing that starts at ``start`` of the run has gone at ``progress``: 0 until ``start``, then
    linear to 1 at the end."""
    if progress <= start:
        return 0.0
    return min(1.0, (progress - start) / max(1e-8, 1.0 - start))


class TimestepSchedule:
    """Samples integer timesteps in [t_min*T, t_max(step)*T]."""

    KINDS = ("none", "linear", "sqrt", "cosine")

    def __init__(self, num_train_timesteps: int, t_min: float, t_max: float, anneal: str = "none",
                 t_max_end: float | None = None, anneal_start: float = 0.0):
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if anneal not in self.KINDS:
            raise ValueError(f"unknown timestep annealing {anneal!r}; expected one of {', '.join(self.KINDS)}")
        t_max_end = t_min if t_max_end is None else t_max_end
        if anneal != "none" and not t_min <= t_max_end <= t_max:
            raise ValueError(f"need t_min <= t_max_end <= t_max, got t_max_end={t_max_end}")
        self.T = num_train_timesteps
        self.t_min, self.t_max, self.t_max_end = t_min, t_max, t_max_end
        self.anneal, self.anneal_start = anneal, anneal_start

    def upper(self, progress: float) -> float:
        """The annealed upper bound (a fraction of T) at ``progress`` in [0, 1] of the run."""
        if self.anneal == "none":
            return self.t_max
        p = anneal_fraction(progress, self.anneal_start)
        shape = {"linear": p, "sqrt": math.sqrt(p), "cosine": 0.5 * (1 - math.cos(math.pi * p))}[self.anneal]
        return self.t_max + (self.t_max_end - self.t_max) * shape

    def bounds(self, progress: float) -> tuple[int, int]:
        lo = int(round(self.t_min * (self.T - 1)))
        hi = max(lo, int(round(self.upper(progress) * (self.T - 1))))
        return lo, hi

    def sample(self, batch_size: int, progress: float, device=None, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        lo, hi = self.bounds(progress)
        t = torch.randint(lo, hi + 1, (batch_size,), generator=generator)
        return t.to(device) if device is not None else t
