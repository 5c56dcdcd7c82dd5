"""Step-indexed schedules of the DINOv2 recipe: lr, weight decay, teacher momentum, temperature.

They follow DINOv2's ``CosineScheduler``: a warm-up of ``W`` steps is ``np.linspace(start,
peak, W)`` (the peak is reached at step ``W - 1``), then a cosine from the peak down to its
final value, which holds from step ``total`` on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Linear:
    """``np.linspace(start, end, steps)[step]``, and ``end`` from step ``steps`` on (a warm-up
    of one step is ``start`` at step 0, as ``linspace`` of one value)."""

    start: float
    end: float
    steps: int

    def __call__(self, step: int) -> float:
        if self.steps <= 0 or step >= self.steps:
            return self.end
        if self.steps == 1:
            return self.start
        return self.start + (self.end - self.start) * step / (self.steps - 1)


@dataclass(frozen=True)
class Cosine:
    """Linear warm-up from ``warmup_value`` to ``start`` over ``warmup`` steps (:class:`Linear`),
    then a cosine from ``start`` at step ``warmup`` to ``end`` at step ``total`` (constant
    afterwards)."""

    start: float
    end: float
    total: int
    warmup: int = 0
    warmup_value: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return Linear(self.warmup_value, self.start, self.warmup)(step)
        span = max(1, self.total - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return self.end + 0.5 * (self.start - self.end) * (1 + math.cos(math.pi * t))


def scaled_lr(base_lr: float, global_batch: int, reference: int = 1024) -> float:
    """DINOv2's square-root scaling: ``base_lr * sqrt(global_batch / reference)``."""
    return base_lr * math.sqrt(global_batch / reference)
