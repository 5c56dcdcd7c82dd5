"""The tile protocols against direct computations on the same features, and the statistics."""

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GroupKFold, GroupShuffleSplit
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.errors import PipelineError
from pipeline.eval.protocols import C_SWEEP, Folds, cross_validate, few_shot, knn, linear_probe
from pipeline.eval.stats import bootstrap_ci, paired_bootstrap


@pytest.fixture(scope="module")
def blobs():
    """Three classes of 20-d features from 12 slides, class means 1.2 apart."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.array(["a", "b", "c"]), 60)
    centres = {c: rng.normal(size=20) * 0.6 for c in "abc"}
    x = np.stack([centres[c] for c in y]) + rng.normal(size=(len(y), 20))
    groups = np.array([f"slide{i % 12}" for i in range(len(y))])
    return x, y, groups


def test_linear_probe_is_the_sklearn_model_with_the_swept_c(blobs):
    x, y, groups = blobs
    folds = Folds.make(y, groups, folds=4)
    items, probs, info = cross_validate("linear", x, y, groups, folds, seed=0)
    expected = []
    for (train, test), meta in zip(GroupKFold(n_splits=4).split(x, y, groups), info, strict=True):
        fit, val = next(
            GroupShuffleSplit(1, test_size=0.2, random_state=0).split(
                x[train], y[train], groups[train]
            )
        )
        scores = []
        for c in C_SWEEP:
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
            clf.fit(x[train][fit], y[train][fit])
            scores.append(balanced_accuracy_score(y[train][val], clf.predict(x[train][val])))
        best = C_SWEEP[int(np.argmax(scores))]
        assert meta["C"] == best
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=best, max_iter=1000))
        expected.append(clf.fit(x[train], y[train]).predict_proba(x[test]))
    np.testing.assert_array_equal(probs, np.concatenate(expected))
    assert sorted(items.tolist()) == list(range(len(y)))


def test_knn_is_temperature_weighted_cosine_votes(blobs):
    x, y, _ = blobs
    train, test = np.arange(0, 180, 2), np.arange(1, 180, 2)
    probs, meta = knn(x[train], y[train], x[test], k=20, temperature=0.07)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit[test] @ unit[train].T  # test x train cosine similarities
    expected = np.zeros((len(test), 3))
    for i, row in enumerate(sims):
        top = np.argsort(-row)[:20]
        for j in top:
            expected[i, "abc".index(y[train][j])] += np.exp(row[j] / 0.07)
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-9, atol=1e-12)
    assert meta == {"k": 20, "T": 0.07}


def test_simpleshot_is_nearest_prototype_of_centred_unit_features(blobs):
    x, y, _ = blobs
    train, test = np.arange(0, 180, 2), np.arange(1, 180, 2)
    got = few_shot(x[train], y[train], x[test], y[test], shots=(1, 4, 40), episodes=3, seed=5)
    assert set(got) == {1, 4}  # 40 > the 30 training examples per class: skipped
    rng = np.random.default_rng(5)
    mean = x[train].mean(0)
    unit = (x - mean) / np.linalg.norm(x - mean, axis=1, keepdims=True)
    by_class = {c: np.flatnonzero(y[train] == c) for c in "abc"}
    for k in (1, 4):
        for episode in range(3):
            support = [rng.choice(by_class[c], k, replace=False) for c in "abc"]
            protos = np.stack([unit[train][s].mean(0) for s in support])  # 3 x D
            dist = ((unit[test][:, None] - protos[None]) ** 2).sum(-1)
            pred = np.array(list("abc"))[dist.argmin(1)]
            assert got[k][episode] == pytest.approx(
                balanced_accuracy_score(y[test], pred), abs=1e-12
            )
    assert np.mean(got[4]) > np.mean(got[1]) > 1 / 3  # more shots help; both above chance


def test_fixed_split_and_bad_folds(blobs):
    x, y, groups = blobs
    split = np.where(np.arange(len(y)) < 120, "train", "test")
    folds = Folds.make(y, groups, split)
    assert len(folds.splits) == 1 and folds.test_items().tolist() == list(range(120, 180))
    with pytest.raises(PipelineError, match="one slide"):
        Folds.make(y, np.zeros(len(y)))
    with pytest.raises(PipelineError, match="train.*test"):
        Folds.make(y, groups, np.full(len(y), "train"))


def test_bootstrap_interval_covers_the_true_value_about_95_percent():
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(200):
        sample = rng.random(150) < 0.8  # accuracy of a classifier that is right 80% of the time
        lo, hi = bootstrap_ci(np.mean, sample.astype(float), n=300, seed=trial)
        covered += lo <= 0.8 <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_paired_bootstrap_separates_a_better_encoder():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)

    def accuracy(idx, pred):
        return float((pred[idx] == y[idx]).mean())

    good = np.where(rng.random(300) < 0.9, y, 1 - y)
    bad = np.where(rng.random(300) < 0.7, y, 1 - y)
    test = paired_bootstrap(accuracy, good, bad, n=500)
    assert test["difference"] == pytest.approx(
        accuracy(np.arange(300), good) - accuracy(np.arange(300), bad)
    )
    assert test["p_value"] < 0.01 and test["ci"][0] > 0
    same = paired_bootstrap(accuracy, good, good.copy(), n=200)
    assert same["difference"] == 0 and same["p_value"] == 1.0


def test_balanced_accuracy_equals_scikit_learns():
    from pipeline.mil.metrics import balanced_accuracy

    rng = np.random.default_rng(0)
    for trial in range(50):
        n = int(rng.integers(1, 60))
        y = rng.choice(np.array(["a", "b", "c", "d"]), n, p=[0.5, 0.3, 0.15, 0.05])
        pred = rng.choice(np.array(["a", "b", "c", "d", "e"]), n)  # "e" is never a label
        if trial % 5 == 0:
            pred = y.copy()
        with warnings.catch_warnings():  # "y_pred contains classes not in y_true"
            warnings.simplefilter("ignore", UserWarning)
            expected = balanced_accuracy_score(y, pred)
        assert balanced_accuracy(y, pred) == pytest.approx(expected, abs=1e-12)
    ints = rng.integers(0, 3, 40)
    assert balanced_accuracy(ints, np.roll(ints, 1)) == pytest.approx(
        balanced_accuracy_score(ints, np.roll(ints, 1))
    )


def test_linear_probe_with_few_patients_and_a_class_of_one_tile(blobs):
    """Under five patients, C is chosen on a stratified split, which cannot hold a class
    with a single training tile: the split is then random, and the probe still fits."""
    x, y, groups = blobs
    train = np.r_[np.arange(0, 60), np.arange(60, 120), [150]]  # one tile of class "c"
    probs, meta = linear_probe(x[train], y[train], x[:5], groups[train] != "", seed=0)
    assert probs.shape == (5, 3) and meta["C"] in C_SWEEP
