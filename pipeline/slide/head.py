"""A bias-free linear classifier on slide embeddings, with patient-grouped cross-validation.

The head is scikit-learn's ``LogisticRegression(fit_intercept=False)`` (L2, lbfgs): a
linear map without bias, as PANTHER's linear evaluation (Song et al., CVPR 2024), fitted
to convergence rather than by a fixed number of SGD epochs. The PANTHER embedding carries
its own intercept (the mixture weights ``pi`` sum to one). With ``standardize`` (the
default; not in the reference) each feature is z-scored with the training slides' mean and
standard deviation, so that one regularisation strength fits ``pi``, ``mu`` and ``Sigma``.

Folds come from :func:`pipeline.mil.splits.make_splits` (stratified by label, grouped by
``case_id``): with the same ``folds`` and ``seed`` the test folds are those of
``cpath train-mil``. A fold's ``val`` slides are used for training (no early stopping).
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError
from pipeline.mil.metrics import classification_metric, single_class_ok
from pipeline.mil.splits import fold_members, make_splits

METRICS = ("balanced_accuracy", "auc")


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
    mean = x.mean(0) if standardize else np.zeros(x.shape[1])
    std = x.std(0) if standardize else np.ones(x.shape[1])
    std = np.where(std > 1e-12, std, 1.0)
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
    index = {s: i for i, s in enumerate(slide_ids)}
    if splits is None:
        rows = [
            {"slide_id": s, "case_id": c, "label": v}
            for s, c, v in zip(slide_ids, case_ids, labels, strict=True)
        ]
        splits = make_splits(rows, folds=folds, val_share=0.0, seed=seed)
    n_folds = sum(1 for k in splits[0] if k.startswith("fold_"))
    results, predictions = [], []
    for k in range(n_folds):
        test = [index[s] for s in fold_members(splits, k, "test") if s in index]
        train = [
            index[s]
            for role in ("train", "val")
            for s in fold_members(splits, k, role)
            if s in index
        ]
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
