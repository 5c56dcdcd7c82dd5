"""Slide-level metrics and their bootstrap confidence intervals (by row or by cluster).

Survival metrics come from torchsurv (Monod et al., 2024): Harrell's C, the time-dependent
AUC and the Brier score, with thin wrappers taking numpy arrays."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

with warnings.catch_warnings():  # torchsurv 0.2 scripts a validator with torch.jit at import
    warnings.filterwarnings(
        "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
    )
    from torchsurv.loss.cox import (  # noqa: F401  (the training loss, imported from here)
        baseline_survival_function,
        neg_partial_log_likelihood,
    )
    from torchsurv.metrics.auc import Auc
    from torchsurv.metrics.brier_score import BrierScore
    from torchsurv.metrics.cindex import ConcordanceIndex
    from torchsurv.stats.ipcw import get_ipcw

CLASSIFICATION_METRICS = ("balanced_accuracy", "f1", "auc")
SINGLE_CLASS_WARNINGS = (  # scikit-learn's, on labels with one class or unseen predictions
    "y_pred contains classes not in y_true",
    "A single label was found in 'y_true' and 'y_pred'",
)


@contextmanager
def single_class_ok() -> Iterator[None]:
    """Silence scikit-learn's warnings on labels with one class or on predicted classes
    absent from the labels: bootstrap resamples and patient-grouped folds meet them by
    design, and each metric is then over the classes of ``y``, which is what they measure."""
    with warnings.catch_warnings():
        for message in SINGLE_CLASS_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Balanced accuracy (mean recall over the classes of ``y``) of class predictions
    ``pred`` (N each): scikit-learn's ``balanced_accuracy_score`` without sample weights,
    computed directly. It is scored thousands of times per task (bootstrap resamples,
    few-shot episodes), where scikit-learn's input checks cost 2.5 ms a call; a class
    predicted but absent from ``y`` counts for nothing, as there."""
    y, pred = np.asarray(y), np.asarray(pred)
    if len(y) != len(pred):
        raise ValueError(f"balanced accuracy of {len(pred)} predictions for {len(y)} labels")
    if len(y) == 0:
        return float("nan")
    _, index = np.unique(y, return_inverse=True)
    hits = np.bincount(index, weights=(y == pred).astype(np.float64))
    return float(np.mean(hits / np.bincount(index)))


def classification_metric(name: str, y: np.ndarray, probs: np.ndarray) -> float:
    """One of :data:`CLASSIFICATION_METRICS` or ``qwk`` (quadratic weighted kappa, for
    ordered labels) of ``probs`` (N x C) against class indices ``y`` (N). AUC is one-vs-rest
    macro for more than two classes, over the classes present in ``y``."""
    if name == "balanced_accuracy":
        return balanced_accuracy(y, probs.argmax(1))
    if name in ("f1", "qwk"):
        with single_class_ok():
            if name == "f1":
                return float(f1_score(y, probs.argmax(1), average="weighted"))
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


def _survival_tensors(time, event, *values) -> tuple[torch.Tensor, ...]:
    """float64 ``time``, bool ``event`` and float64 ``values`` as torch tensors (N each)."""
    time = torch.as_tensor(np.asarray(time, np.float64).reshape(-1))
    event = torch.as_tensor(np.asarray(event, np.float64).reshape(-1) > 0)
    return (time, event, *(torch.as_tensor(np.asarray(v, np.float64)) for v in values))


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C (Harrell et al., 1996) by torchsurv's ``ConcordanceIndex``: among
    comparable pairs, the share where the earlier one has the higher ``risk``; tied risks
    count one half. A pair is comparable when the earlier time is an event; an event and a
    censoring at the same time are comparable (the event first), two events at the same time
    are not. NaN without a comparable pair. ``time``, ``event``, ``risk``: N each."""
    time_t, event_t, risk_t = _survival_tensors(time, event, risk)
    if len(time_t) < 2 or not bool(event_t.any()):
        return float("nan")
    try:
        return float(ConcordanceIndex()(risk_t, event_t, time_t, instate=False))
    except ValueError:  # no comparable pair
        return float("nan")


def survival_horizons(
    time: np.ndarray, event: np.ndarray, quantiles: tuple[float, ...] = (0.25, 0.5, 0.75)
) -> list[float]:
    """Evaluation times of :func:`survival_metrics`: ``quantiles`` of the event times (of
    all times when there is no event), rounded to 6 significant digits, sorted, unique."""
    time = np.asarray(time, np.float64)
    event = np.asarray(event, np.float64) > 0
    times = time[event] if event.any() else time
    if not len(times):
        return []
    return sorted({float(f"{q:.6g}") for q in np.quantile(times, quantiles)})


def _usable(time: torch.Tensor, event: torch.Tensor, horizons: torch.Tensor) -> bool:
    """Every horizon lies in the follow-up ``[min time, max time)`` and has an event at or
    before it (a case) and a time after it (a control)."""
    if not len(horizons) or len(time) < 2:
        return False
    cases = ((time[:, None] <= horizons) & event[:, None]).any(0)  # H
    controls = (time[:, None] > horizons).any(0)  # H
    return bool((horizons >= time.min()).all() and cases.all() and controls.all())


def _ipcw(event: torch.Tensor, time: torch.Tensor, at: torch.Tensor | None = None):
    """Inverse probability of censoring weights (Kaplan-Meier of the censoring times of the
    evaluated slides; torchsurv ``get_ipcw``) at ``time`` or at ``at``."""
    with warnings.catch_warnings():  # zero censoring survival: torchsurv weights 0 and warns
        warnings.simplefilter("ignore", UserWarning)
        return get_ipcw(event, time, at)


def time_dependent_auc(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, horizons: list[float]
) -> float:
    """Integrated cumulative/dynamic AUC of ``risk`` (N) at ``horizons`` (torchsurv ``Auc``):
    AUC(t) = P(risk_i > risk_j | T_i <= t < T_j), censoring-adjusted with inverse probability
    of censoring weights (Uno et al., 2007), averaged over the horizons weighted by the
    Kaplan-Meier probability of an event in each interval up to the horizon (Heagerty and
    Zheng, 2005; ``Auc.integral``). NaN when a horizon is outside the follow-up or has no
    case or no control."""
    time_t, event_t, risk_t, at = _survival_tensors(time, event, risk, horizons)
    if not _usable(time_t, event_t, at):
        return float("nan")
    auc = Auc()
    auc(
        risk_t,
        event_t,
        time_t,
        auc_type="cumulative",
        weight=_ipcw(event_t, time_t),
        new_time=at,
        weight_new_time=_ipcw(event_t, time_t, at),
    )
    return float(auc.integral())


def integrated_brier_score(
    time: np.ndarray, event: np.ndarray, survival: np.ndarray, horizons: list[float]
) -> float:
    """Integrated Brier score (Graf et al., 1999; torchsurv ``BrierScore``) of the predicted
    survival probabilities ``survival`` (N x H, at ``horizons``): the mean squared error of
    the survival status at each horizon, censoring-adjusted with inverse probability of
    censoring weights, integrated over the horizons by the trapezoidal rule and divided by
    their span (one horizon: its score). Lower is better. NaN as :func:`time_dependent_auc`."""
    time_t, event_t, surv_t, at = _survival_tensors(time, event, survival, horizons)
    if not _usable(time_t, event_t, at) or not bool(torch.isfinite(surv_t).all()):
        return float("nan")
    brier = BrierScore()
    brier(
        surv_t.clamp(0, 1).reshape(len(time_t), len(at)),
        event_t,
        time_t,
        new_time=at,
        weight=_ipcw(event_t, time_t),
        weight_new_time=_ipcw(event_t, time_t, at),
    )
    return float(brier.integral())


def survival_metrics(
    time: np.ndarray,
    event: np.ndarray,
    risk: np.ndarray,
    survival: np.ndarray | None = None,
    horizons: list[float] | None = None,
) -> dict[str, float]:
    """``c_index`` (:func:`concordance_index`) and, with ``horizons``, ``td_auc``
    (:func:`time_dependent_auc`) and, with predicted ``survival`` (N x H) at them, ``ibs``
    (:func:`integrated_brier_score`). ``time``, ``event``, ``risk``: N each."""
    scores = {"c_index": concordance_index(time, event, risk)}
    if horizons:
        scores["td_auc"] = time_dependent_auc(time, event, risk, horizons)
        if survival is not None:
            scores["ibs"] = integrated_brier_score(time, event, survival, horizons)
    return scores


def resampler(
    size: int, groups: np.ndarray | None = None, seed: int = 0
) -> Callable[[], np.ndarray]:
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


def bootstrap_cis(
    metrics: Callable[[np.ndarray], dict[str, float]],
    size: int,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
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
    return {
        name: tuple(float(v) for v in np.percentile(vals, q))
        if vals
        else (float("nan"), float("nan"))
        for name, vals in values.items()
    }


def bootstrap_ci(
    metric: Callable[..., float],
    *arrays: np.ndarray,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile interval of ``metric`` over ``n`` resamples (with replacement) of the rows,
    or of whole clusters of rows with ``groups`` (see :func:`resampler`)."""
    cis = bootstrap_cis(
        lambda idx: {"m": metric(*(a[idx] for a in arrays))},
        len(arrays[0]),
        n=n,
        seed=seed,
        level=level,
        groups=groups,
    )
    return cis.get("m", (float("nan"), float("nan")))
