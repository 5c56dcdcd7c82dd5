"""Slide-level metrics and their bootstrap confidence intervals (by row or by cluster)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

CLASSIFICATION_METRICS = ("balanced_accuracy", "f1", "auc")


def classification_metric(name: str, y: np.ndarray, probs: np.ndarray) -> float:
    """One of :data:`CLASSIFICATION_METRICS` or ``qwk`` (quadratic weighted kappa, for
    ordered labels) of ``probs`` (N x C) against class indices ``y`` (N). AUC is one-vs-rest
    macro for more than two classes, over the classes present in ``y``."""
    if name == "balanced_accuracy":
        return float(balanced_accuracy_score(y, probs.argmax(1)))
    if name == "f1":
        return float(f1_score(y, probs.argmax(1), average="weighted"))
    if name == "qwk":
        return float(cohen_kappa_score(y, probs.argmax(1), weights="quadratic"))
    if name != "auc":
        raise ValueError(f"unknown classification metric '{name}'")
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    cols = probs[:, present] / probs[:, present].sum(1, keepdims=True).clip(1e-12)
    return float(roc_auc_score(y, cols, multi_class="ovr", labels=present))


def classification_metrics(
    y: np.ndarray, probs: np.ndarray, ordinal: bool = False
) -> dict[str, float]:
    """Balanced accuracy, weighted F1, AUC and, for ordered labels, quadratic weighted kappa
    (see :func:`classification_metric`). ``y``: N class indices; ``probs``: N x C."""
    names = CLASSIFICATION_METRICS + (("qwk",) if ordinal else ())
    return {name: classification_metric(name, y, probs) for name in names}


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C: among comparable pairs (the earlier time had an event), the share where
    the earlier one has the higher risk; ties in risk count one half."""
    time, event, risk = (np.asarray(a, float) for a in (time, event, risk))
    earlier = (time[:, None] < time[None, :]) & (event[:, None] > 0)  # i before j, i observed
    if not earlier.any():
        return float("nan")
    higher = (risk[:, None] > risk[None, :]) + 0.5 * (risk[:, None] == risk[None, :])
    return float((higher * earlier).sum() / earlier.sum())


def resampler(size: int, groups: np.ndarray | None = None, seed: int = 0
              ) -> Callable[[], np.ndarray]:  # fmt: skip
    """Draws of bootstrap row indices: ``size`` rows with replacement, or, with ``groups``
    (one cluster id per row: the slide of a tile, the patient of a slide), as many whole
    clusters with replacement, all rows of each (the cluster bootstrap; Field and Welsh,
    JRSS-B 2007). Rows of one cluster are correlated, so resampling them one by one gives
    intervals that are too narrow and p-values that are too small."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return lambda: rng.integers(0, size, size)
    groups = np.asarray(groups)
    if len(groups) != size:
        raise ValueError(f"{len(groups)} cluster ids for {size} rows")
    _, codes, counts = np.unique(groups, return_inverse=True, return_counts=True)
    order = np.argsort(codes, kind="stable")  # rows sorted by cluster
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # first sorted row of each cluster

    def draw() -> np.ndarray:
        picked = rng.integers(0, len(counts), len(counts))  # G clusters
        lengths = counts[picked]
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return order[np.repeat(starts[picked], lengths) + within]  # rows of the picked clusters

    return draw


def bootstrap_cis(metrics: Callable[[np.ndarray], dict[str, float]], size: int, n: int = 1000,
                  seed: int = 0, level: float = 0.95,
                  groups: np.ndarray | None = None) -> dict[str, tuple[float, float]]:  # fmt: skip
    """Percentile intervals of every metric of ``metrics(idx)`` over ``n`` resamples (with
    replacement) of ``size`` rows, or of whole clusters of rows with ``groups`` (see
    :func:`resampler`); each resample is scored once for all metrics."""
    draw = resampler(size, groups, seed)
    values: dict[str, list[float]] = {}
    for _ in range(n):
        with warnings.catch_warnings():  # a resample may lack a class: its metric is nan
            warnings.simplefilter("ignore", UserWarning)
            scores = metrics(draw())
        for name, value in scores.items():
            values.setdefault(name, [])
            if np.isfinite(value):
                values[name].append(value)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    return {name: tuple(float(v) for v in np.percentile(vals, q)) if vals
            else (float("nan"), float("nan")) for name, vals in values.items()}  # fmt: skip


def bootstrap_ci(metric: Callable[..., float], *arrays: np.ndarray, n: int = 1000, seed: int = 0,
                 level: float = 0.95, groups: np.ndarray | None = None) -> tuple[float, float]:  # fmt: skip
    """Percentile interval of ``metric`` over ``n`` resamples (with replacement) of the rows,
    or of whole clusters of rows with ``groups`` (see :func:`resampler`)."""
    cis = bootstrap_cis(lambda idx: {"m": metric(*(a[idx] for a in arrays))}, len(arrays[0]),
                        n=n, seed=seed, level=level, groups=groups)  # fmt: skip
    return cis.get("m", (float("nan"), float("nan")))
