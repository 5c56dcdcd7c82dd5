"""Slide-level metrics and their bootstrap confidence intervals."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score


def classification_metrics(
    y: np.ndarray, probs: np.ndarray, ordinal: bool = False
) -> dict[str, float]:
    """AUC (one-vs-rest macro for more than two classes), balanced accuracy, weighted F1 and,
    for ordered labels, quadratic weighted kappa. ``y``: N class indices; ``probs``: N x C."""
    pred = probs.argmax(1)
    out = {"balanced_accuracy": float(balanced_accuracy_score(y, pred)),
           "f1": float(f1_score(y, pred, average="weighted"))}  # fmt: skip
    present = np.unique(y)
    if len(present) < 2:
        out["auc"] = float("nan")
    elif probs.shape[1] == 2:
        out["auc"] = float(roc_auc_score(y, probs[:, 1]))
    else:
        cols = probs[:, present] / probs[:, present].sum(1, keepdims=True).clip(1e-12)
        out["auc"] = float(roc_auc_score(y, cols, multi_class="ovr", labels=present))
    if ordinal:
        out["qwk"] = float(cohen_kappa_score(y, pred, weights="quadratic"))
    return out


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C: among comparable pairs (the earlier time had an event), the share where
    the earlier one has the higher risk; ties in risk count one half."""
    time, event, risk = (np.asarray(a, float) for a in (time, event, risk))
    earlier = (time[:, None] < time[None, :]) & (event[:, None] > 0)  # i before j, i observed
    if not earlier.any():
        return float("nan")
    higher = (risk[:, None] > risk[None, :]) + 0.5 * (risk[:, None] == risk[None, :])
    return float((higher * earlier).sum() / earlier.sum())


def bootstrap_ci(metric: Callable[..., float], *arrays: np.ndarray, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """Percentile interval of ``metric`` over ``n`` resamples (with replacement) of the rows."""
    rng = np.random.default_rng(seed)
    size = len(arrays[0])
    values = []
    for _ in range(n):
        idx = rng.integers(0, size, size)
        value = metric(*(a[idx] for a in arrays))
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.percentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)
