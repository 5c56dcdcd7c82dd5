"""Tile-level protocols on frozen features: linear probe, kNN and SimpleShot few-shot.

Each protocol fits on a training set and predicts a test set; :func:`cross_validate`
runs one over grouped folds (no patient, or where patients are unknown no slide, on both
sides) or a fixed train/test split, and
returns pooled out-of-fold predictions. The choices follow the published pathology
encoder benchmarks (UNI, Chen et al., Nature Medicine 2024; eva):

- linear probe: standardised features, L-BFGS logistic regression, the inverse
  regularisation ``C`` chosen from a small sweep on a validation split of the training
  set (grouped as the folds), then refit on the whole training set;
- kNN: cosine similarity, ``k = 20`` neighbours, votes weighted by ``exp(sim / T)`` with
  ``T = 0.07`` (Wu et al., CVPR 2018; DINO's kNN evaluation);
- SimpleShot (Wang et al., 2019): features centred by the training pool's mean and
  L2-normalised, nearest class prototype, over many random episodes of ``k`` labelled
  examples per class.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import (
    GroupKFold,
    GroupShuffleSplit,
    ShuffleSplit,
    StratifiedShuffleSplit,
)
from sklearn.neighbors import KNeighborsClassifier, NearestCentroid
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler, normalize

from pipeline.errors import PipelineError
from pipeline.mil.metrics import balanced_accuracy

C_SWEEP = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _logistic(c: float, max_iter: int = 1000):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))


def _validation_split(labels: np.ndarray, groups: np.ndarray, seed: int):
    """Train/validation indices inside a training set: by group when there are enough,
    else stratified by class (unless a class has a single item: then at random)."""
    if len(np.unique(groups)) >= 5:
        return next(
            GroupShuffleSplit(1, test_size=0.2, random_state=seed).split(labels, labels, groups)
        )
    if np.unique(labels, return_counts=True)[1].min() < 2:
        return next(ShuffleSplit(1, test_size=0.2, random_state=seed).split(labels))
    return next(StratifiedShuffleSplit(1, test_size=0.2, random_state=seed).split(labels, labels))


def choose_c(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    seed: int = 0,
    sweep: tuple[float, ...] = C_SWEEP,
) -> float:
    """The ``C`` of the sweep with the best balanced accuracy on a validation split."""
    fit, val = _validation_split(y, groups, seed)
    if len(np.unique(y[fit])) < len(np.unique(y)) or len(val) == 0:
        return 1.0
    scores = [
        balanced_accuracy(y[val], _logistic(c).fit(x[fit], y[fit]).predict(x[val])) for c in sweep
    ]
    return float(sweep[int(np.argmax(scores))])


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    train_groups: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Class probabilities (``N_test x C``, classes sorted) and ``{"C": chosen}``."""
    groups = train_groups if train_groups is not None else np.arange(len(train_y))
    c = choose_c(train_x, train_y, groups, seed)
    return _logistic(c).fit(train_x, train_y).predict_proba(test_x), {"C": c}


def knn_weights(temperature: float):
    """sklearn weights from cosine distances ``d = 1 - sim``: ``exp(sim / T)``."""

    def weights(distances: np.ndarray) -> np.ndarray:
        return np.exp((1 - distances) / temperature)

    return weights


def knn(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
) -> tuple[np.ndarray, dict]:
    """Temperature-weighted cosine kNN: vote shares per class (``N_test x C``)."""
    k = min(k, len(train_x))
    model = KNeighborsClassifier(
        n_neighbors=k, metric="cosine", weights=knn_weights(temperature), algorithm="brute"
    )
    return model.fit(train_x, train_y).predict_proba(test_x), {"k": k, "T": temperature}


def simpleshot_transform(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Centre by the training pool's mean, then L2-normalise (the SimpleShot 'CL2N')."""
    return normalize(x - mean)


def few_shot(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    shots: tuple[int, ...] = (1, 2, 4, 8, 16),
    episodes: int = 100,
    seed: int = 0,
) -> dict[int, list[float]]:
    """Balanced accuracy of nearest-prototype classification, per shot count, per episode.

    Each episode draws ``k`` training examples of every class (without replacement;
    shot counts above the smallest class are skipped), builds the class prototypes of
    the CL2N features and classifies every test example.
    """
    classes = np.unique(train_y)
    mean = train_x.mean(0)
    train_t, test_t = simpleshot_transform(train_x, mean), simpleshot_transform(test_x, mean)
    smallest = min(int((train_y == c).sum()) for c in classes)
    rng = np.random.default_rng(seed)
    by_class = {c: np.flatnonzero(train_y == c) for c in classes}
    out: dict[int, list[float]] = {}
    for k in shots:
        if k > smallest:
            continue
        scores = []
        for _ in range(episodes):
            support = np.concatenate([rng.choice(by_class[c], k, replace=False) for c in classes])
            with np.errstate(invalid="ignore", divide="ignore"):  # 1 shot: no class variance
                model = NearestCentroid().fit(train_t[support], train_y[support])
            scores.append(balanced_accuracy(test_y, model.predict(test_t)))
        out[k] = scores
    return out


@dataclass
class Folds:
    """Where each item is tested: ``(train indices, test indices)`` per fold."""

    splits: list[tuple[np.ndarray, np.ndarray]]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return iter(self.splits)

    @classmethod
    def make(
        cls,
        labels: np.ndarray,
        groups: np.ndarray,
        split: np.ndarray | None = None,
        folds: int = 5,
        what: str = "slide",
    ) -> Folds:
        """A fixed train/test split when ``split`` is given, else k folds grouped by
        ``groups``: each item's patient, or its slide (``what`` names which, for errors)."""
        if split is not None:
            train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
            if len(train) == 0 or len(test) == 0:
                raise PipelineError("a split column needs both 'train' and 'test' rows")
            return cls([(train, test)])
        n_groups = len(np.unique(groups))
        if n_groups < 2:
            raise PipelineError(
                f"all tiles come from one {what}: cross-validation by {what} needs two or more "
                "(or give a split column with train/test)"
            )
        cv = GroupKFold(n_splits=min(folds, n_groups))
        return cls([(tr, te) for tr, te in cv.split(labels, labels, groups)])

    def test_items(self) -> np.ndarray:
        return np.concatenate([te for _, te in self.splits])


def cross_validate(
    protocol: str,
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    folds: Folds,
    seed: int = 0,
    test_x: np.ndarray | None = None,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray, list]:
    """Pooled test predictions of ``linear`` or ``knn``: ``(test items, probs N x C, fit info)``.

    Probabilities are over all classes of ``y`` (sorted), zero for a class that a fold's
    training set lacks. ``test_x``: other features of the same items to predict from
    (e.g. of stain-shifted tiles), the model still fitted on ``x``."""
    test_x = x if test_x is None else test_x
    classes = np.unique(y)
    items, probs, info = [], [], []
    for train, test in folds:
        if protocol == "linear":
            p, meta = linear_probe(x[train], y[train], test_x[test], groups[train], seed)
        elif protocol == "knn":
            p, meta = knn(x[train], y[train], test_x[test], **kwargs)
        else:
            raise PipelineError(f"unknown protocol '{protocol}': linear or knn")
        full = np.zeros((len(test), len(classes)))
        full[:, np.searchsorted(classes, np.unique(y[train]))] = p
        items.append(test)
        probs.append(full)
        info.append(meta)
    return np.concatenate(items), np.concatenate(probs), info
