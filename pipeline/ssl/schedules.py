"""Step-indexed schedules of the DINOv2 recipe: lr, weight decay, teacher momentum, temperature."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Cosine:
    """Linear warm-up from ``warmup_value`` to ``start`` over ``warmup`` steps, then a cosine
    from ``start`` to ``end`` at step ``total`` (constant afterwards)."""

    start: float
    end: float
    total: int
    warmup: int = 0
    warmup_value: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.warmup_value + (self.start - self.warmup_value) * step / self.warmup
        span = max(1, self.total - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return self.end + 0.5 * (self.start - self.end) * (1 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Linear:
    """Linear from ``start`` to ``end`` over ``steps`` steps, then ``end``."""

    start: float
    end: float
    steps: int

    def __call__(self, step: int) -> float:
        if self.steps <= 0 or step >= self.steps:
            return self.end
        return self.start + (self.end - self.start) * step / self.steps


def scaled_lr(base_lr: float, global_batch: int, reference: int = 1024) -> float:
    """DINOv2's square-root scaling: ``base_lr * sqrt(global_batch / reference)``."""
    return base_lr * math.sqrt(global_batch / reference)
