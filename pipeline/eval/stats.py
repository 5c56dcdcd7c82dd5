"""Confidence intervals and paired comparisons of two encoders on the same test items,
resampling whole clusters (slides, patients) of items where they are given."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.mil.metrics import bootstrap_ci, resampler

__all__ = ["bootstrap_ci", "paired_bootstrap"]


def paired_bootstrap(
    metric: Callable[[np.ndarray], float],
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: np.ndarray | None = None,
) -> dict[str, float]:
    """Difference ``metric(a) - metric(b)`` on the same resampled items, its percentile CI
    and a two-sided p-value (twice the share of resamples on the far side of zero).

    ``metric(idx, preds)`` scores the predictions ``preds`` of the items ``idx``; both
    encoders are scored on the same ``idx`` in each resample, so item difficulty cancels.
    ``groups``: a cluster id per item (slide of a tile, patient of a slide); whole clusters
    are resampled (see :func:`pipeline.mil.metrics.resampler`).
    """
    size = len(pred_a)
    if len(pred_b) != size:
        raise ValueError(f"paired comparison of {size} and {len(pred_b)} predictions")
    everything = np.arange(size)
    observed = metric(everything, pred_a) - metric(everything, pred_b)
    draw = resampler(size, groups, seed)
    diffs = []
    for _ in range(n):
        idx = draw()
        d = metric(idx, pred_a) - metric(idx, pred_b)
        if np.isfinite(d):
            diffs.append(d)
    if not diffs:
        return {"difference": float(observed), "ci": [float("nan")] * 2, "p_value": float("nan")}
    diffs = np.array(diffs)
    lo, hi = np.percentile(diffs, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    p = 2 * min((diffs <= 0).mean(), (diffs >= 0).mean())
    return {
        "difference": float(observed),
        "ci": [float(lo), float(hi)],
        "p_value": float(min(1.0, p)),
    }
