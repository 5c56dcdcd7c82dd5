"""Linear heads on slide embeddings (a bias-free classifier, a Cox model), with
patient-grouped cross-validation.

The head is scikit-learn's ``LogisticRegression(fit_intercept=False)`` (L2, lbfgs): a
linear map without bias, as PANTHER's linear evaluation (Song et al., CVPR 2024), fitted
to convergence rather than by a fixed number of SGD epochs. The PANTHER embedding carries
its own intercept (the mixture weights ``pi`` sum to one). With ``standardize`` (the
default; not in the reference) each feature is z-scored with the training slides' mean and
standard deviation, so that one regularisation strength fits ``pi``, ``mu`` and ``Sigma``.

Folds come from :func:`pipeline.mil.splits.make_splits` (stratified by label, grouped by
``case_id``): with the same ``folds`` and ``seed`` the test folds are those of
``cpath train-mil``. A fold's ``val`` slides are used for training (no early stopping).

The survival head (:func:`fit_cox`, :func:`cross_validate_survival`) is a linear Cox
proportional-hazards model (Cox, 1972; no intercept, as Cox models have none) on the
embeddings, standardized as above, that returns the log relative hazard (risk, higher =
earlier event). It minimises the mean negative Cox partial log-likelihood (torchsurv's, by
the project's :func:`pipeline.mil.training.cox_loss`, Efron's ties) over the ``n`` training
slides plus ``0.5 / (reg n) ||beta||^2``: the same scale as scikit-learn's ``C = reg``
(``reg`` times the summed loss plus ``0.5 ||beta||^2``), and lifelines' ``CoxPHFitter`` with
``penalizer = 1 / (reg n)``, ``l1_ratio = 0``. It is fitted to convergence by full-batch
L-BFGS (torch). Folds are stratified by ``event`` (as ``train-mil --task survival``) and
scored by Harrell's C-index (:func:`pipeline.mil.metrics.concordance_index`).
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.errors import PipelineError
from pipeline.mil.metrics import classification_metric, concordance_index, single_class_ok
from pipeline.mil.splits import fold_members, make_splits

log = logging.getLogger(__name__)

METRICS = ("balanced_accuracy", "auc")


def fold_indices(splits: list[dict], slide_ids: list[str]):
    """Per fold of ``splits``: ``(k, train, test)``, the row indices (into ``slide_ids``) of
    its training slides (``train`` and ``val``: no early stopping here) and test slides."""
    index = {s: i for i, s in enumerate(slide_ids)}
    n_folds = sum(1 for key in splits[0] if key.startswith("fold_"))
    for k in range(n_folds):
        test = [index[s] for s in fold_members(splits, k, "test") if s in index]
        train = [
            index[s]
            for role in ("train", "val")
            for s in fold_members(splits, k, role)
            if s in index
        ]
        yield k, train, test


def fit_linear(
    x: np.ndarray,  # N x D
    y: np.ndarray,  # N class indices
    reg: float = 1.0,
    standardize: bool = True,
    seed: int = 0,
):
    """A fitted bias-free linear classifier; returns ``predict_proba(x) -> N x K``."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, np.float64)
    mean, std = _standardizer(x, standardize)
    model = LogisticRegression(C=reg, fit_intercept=False, max_iter=2000, random_state=seed)
    model.fit((x - mean) / std, y)

    def predict_proba(z: np.ndarray) -> np.ndarray:  # N x K, columns in class-index order
        probs = model.predict_proba((np.asarray(z, np.float64) - mean) / std)
        full = np.zeros((len(z), int(y.max()) + 1))
        full[:, model.classes_] = probs
        return full

    return predict_proba


def cross_validate(
    x: np.ndarray,  # N x D
    labels: list[str],
    case_ids: list[str] | None = None,
    folds: int = 5,
    seed: int = 0,
    reg: float = 1.0,
    standardize: bool = True,
    splits: list[dict] | None = None,
    slide_ids: list[str] | None = None,
) -> dict:
    """Per-fold and mean balanced accuracy and AUC of :func:`fit_linear` on ``x``.

    Returns ``{"classes", "folds": [{fold, n_train, n_test, balanced_accuracy, auc}],
    "mean": {...}, "std": {...}, "splits": rows, "predictions": rows}``.
    """
    n = len(x)
    slide_ids = slide_ids or [f"slide_{i}" for i in range(n)]
    case_ids = case_ids or slide_ids
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise PipelineError(f"the labels have one class ({classes}); a classifier needs two")
    y = np.array([classes.index(v) for v in labels])
    if splits is None:
        rows = [
            {"slide_id": s, "case_id": c, "label": v}
            for s, c, v in zip(slide_ids, case_ids, labels, strict=True)
        ]
        splits = make_splits(rows, folds=folds, val_share=0.0, seed=seed)
    results, predictions = [], []
    for k, train, test in fold_indices(splits, slide_ids):
        if len(set(y[train])) < 2:
            raise PipelineError(f"fold {k}: the training slides have one class; use fewer folds")
        predict = fit_linear(x[train], y[train], reg=reg, standardize=standardize, seed=seed)
        probs = predict(x[test])  # n_test x K
        with single_class_ok():
            scores = {m: classification_metric(m, y[test], probs) for m in METRICS}
        results.append({"fold": k, "n_train": len(train), "n_test": len(test), **scores})
        predictions += [
            {
                "slide_id": slide_ids[i],
                "fold": k,
                "label": classes[y[i]],
                **{f"prob_{c}": float(p) for c, p in zip(classes, probs[j], strict=True)},
            }
            for j, i in enumerate(test)
        ]
    mean = {m: float(np.nanmean([r[m] for r in results])) for m in METRICS}
    std = {m: float(np.nanstd([r[m] for r in results])) for m in METRICS}
    return {
        "classes": classes,
        "folds": results,
        "mean": mean,
        "std": std,
        "splits": splits,
        "predictions": predictions,
    }


def _standardizer(x: np.ndarray, standardize: bool):
    """``(mean, std)`` of the columns of ``x`` (zeros and ones without ``standardize``);
    constant columns keep a standard deviation of one."""
    mean = x.mean(0) if standardize else np.zeros(x.shape[1])
    std = x.std(0) if standardize else np.ones(x.shape[1])
    return mean, np.where(std > 1e-12, std, 1.0)


def cox_coefficients(
    z: np.ndarray,  # N x D
    time: np.ndarray,  # N
    event: np.ndarray,  # N, 1 = event, 0 = censored
    penalty: float,
    max_iter: int = 1000,
) -> np.ndarray:  # D
    """The ``beta`` that minimises the mean (over the ``N`` rows) negative Cox partial
    log-likelihood of ``risk = z @ beta`` (Efron's ties) plus ``0.5 * penalty * ||beta||^2``:
    lifelines' ``CoxPHFitter(penalizer=penalty, l1_ratio=0)`` on already standardized
    columns (lifelines scales by the ddof-1 standard deviation, the head by ddof 0).
    Full-batch L-BFGS from ``beta = 0``: a strong-Wolfe line search, then plain steps, as
    torchsurv evaluates the likelihood in float32 (agreement with lifelines ~1e-5)."""
    import torch

    from pipeline.mil.training import cox_loss

    z_t = torch.as_tensor(np.asarray(z, np.float64))
    time_t = torch.as_tensor(np.asarray(time, np.float64))
    event_t = torch.as_tensor(np.asarray(event) > 0)
    n_events = int(event_t.sum())
    if n_events == 0:
        raise PipelineError("no events among the training slides; a Cox model needs events")
    share = n_events / len(z_t)  # cox_loss is per event; this makes it per slide
    beta = torch.zeros(z_t.shape[1], dtype=torch.float64, requires_grad=True)

    def gradient() -> tuple[torch.Tensor, float]:  # objective and the largest |gradient|
        beta.grad = None
        loss = cox_loss(z_t @ beta, time_t, event_t).double() * share
        loss = loss + 0.5 * penalty * beta.pow(2).sum()
        loss.backward()
        return loss, float(beta.grad.abs().max())

    # torchsurv computes the likelihood in float32, below whose resolution a line search
    # cannot see progress near the optimum: a strong-Wolfe run, then plain L-BFGS steps,
    # which only need the gradient, kept when they lower it
    for search, iters, tolerance in (("strong_wolfe", max_iter, 1e-9), (None, 200, 1e-7)):
        start, (_, before) = beta.detach().clone(), gradient()
        opt = torch.optim.LBFGS(
            [beta],
            lr=1.0,
            max_iter=iters,
            max_eval=2 * iters,
            tolerance_grad=tolerance,
            tolerance_change=1e-12 if search else 0.0,
            history_size=50,
            line_search_fn=search,
        )
        opt.step(lambda: gradient()[0])
        _, after = gradient()
        if not after <= before:  # a diverging step (or NaN): back to the start
            with torch.no_grad():
                beta.copy_(start)
    _, largest = gradient()
    if largest > 1e-4:
        log.warning("the Cox head did not converge (largest gradient %.2g)", largest)
    return beta.detach().numpy().copy()


def fit_cox(
    x: np.ndarray,  # N x D
    time: np.ndarray,  # N
    event: np.ndarray,  # N
    reg: float = 1.0,
    standardize: bool = True,
):
    """A fitted linear Cox model (see the module docstring); returns
    ``predict_risk(x) -> N`` log relative hazards."""
    x = np.asarray(x, np.float64)
    mean, std = _standardizer(x, standardize)
    beta = cox_coefficients((x - mean) / std, time, event, penalty=1.0 / (reg * len(x)))

    def predict_risk(z: np.ndarray) -> np.ndarray:  # N
        return ((np.asarray(z, np.float64) - mean) / std) @ beta

    return predict_risk


def cross_validate_survival(
    x: np.ndarray,  # N x D
    time: np.ndarray,  # N
    event: np.ndarray,  # N
    case_ids: list[str] | None = None,
    folds: int = 5,
    seed: int = 0,
    reg: float = 1.0,
    standardize: bool = True,
    splits: list[dict] | None = None,
    slide_ids: list[str] | None = None,
) -> dict:
    """Per-fold and mean Harrell's C-index of :func:`fit_cox` on ``x``.

    Returns ``{"folds": [{fold, n_train, n_test, n_events_test, c_index}], "mean":
    {"c_index"}, "std": {...}, "splits": rows, "predictions": rows}`` with prediction rows
    ``slide_id, case_id, fold, time, event, risk``.
    """
    n = len(x)
    time = np.asarray(time, np.float64)
    event = (np.asarray(event) > 0).astype(int)
    slide_ids = slide_ids or [f"slide_{i}" for i in range(n)]
    case_ids = case_ids or slide_ids
    if not event.any():
        raise PipelineError("no slide has an event (event = 1); a Cox model needs events")
    if splits is None:
        rows = [
            {"slide_id": s, "case_id": c, "label": str(e), "event": str(e)}
            for s, c, e in zip(slide_ids, case_ids, event, strict=True)
        ]
        splits = make_splits(rows, folds=folds, val_share=0.0, seed=seed, stratify="event")
    results, predictions = [], []
    for k, train, test in fold_indices(splits, slide_ids):
        if not event[train].any():
            raise PipelineError(
                f"fold {k}: no event among its {len(train)} training slides; a Cox model "
                "needs events: use fewer folds or other splits"
            )
        predict = fit_cox(x[train], time[train], event[train], reg=reg, standardize=standardize)
        risk = predict(x[test])  # n_test
        c_index = concordance_index(time[test], event[test], risk)
        results.append(
            {
                "fold": k,
                "n_train": len(train),
                "n_test": len(test),
                "n_events_test": int(event[test].sum()),
                "c_index": c_index,
            }
        )
        predictions += [
            {
                "slide_id": slide_ids[i],
                "case_id": case_ids[i],
                "fold": k,
                "time": float(time[i]),
                "event": int(event[i]),
                "risk": float(r),
            }
            for i, r in zip(test, risk, strict=True)
        ]
    scores = [r["c_index"] for r in results]
    finite = not all(np.isnan(scores))
    return {
        "folds": results,
        "mean": {"c_index": float(np.nanmean(scores)) if finite else float("nan")},
        "std": {"c_index": float(np.nanstd(scores)) if finite else float("nan")},
        "splits": splits,
        "predictions": predictions,
    }
