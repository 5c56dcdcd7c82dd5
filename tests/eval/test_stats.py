"""The cluster bootstrap: whole slides (or patients) resampled, not their tiles one by one."""

import numpy as np
import pytest

from pipeline.eval.stats import bootstrap_ci, paired_bootstrap
from pipeline.mil.metrics import resampler


def test_resampler_draws_whole_clusters():
    groups = np.array(["a", "b", "a", "c", "b", "a"])
    draw = resampler(len(groups), groups, seed=0)
    for _ in range(20):
        idx = draw()
        picked, counts = np.unique(groups[idx], return_counts=True)
        size = {"a": 3, "b": 2, "c": 1}
        assert all(n % size[g] == 0 for g, n in zip(picked, counts, strict=True))
        assert sum(n // size[g] for g, n in zip(picked, counts, strict=True)) == 3  # 3 clusters
    with pytest.raises(ValueError, match="5 cluster ids for 6 rows"):
        resampler(6, groups[:5])


def test_cluster_interval_is_wider_and_covers_about_95_percent():
    """30 slides of 40 tiles each; a slide's tiles are all right or all wrong (probability
    0.8), so the information is that of 30 items, not 1,200."""
    rng = np.random.default_rng(0)
    slides = np.repeat(np.arange(30), 40)
    covered = {"naive": 0, "cluster": 0}
    width = {"naive": [], "cluster": []}
    trials = 150
    for trial in range(trials):
        right = (rng.random(30) < 0.8)[slides].astype(float)  # 1200 tiles
        for name, groups in (("naive", None), ("cluster", slides)):
            lo, hi = bootstrap_ci(np.mean, right, n=200, seed=trial, groups=groups)
            covered[name] += lo <= 0.8 <= hi
            width[name].append(hi - lo)
    assert np.mean(width["cluster"]) > 4 * np.mean(width["naive"])  # about sqrt(40) = 6.3
    assert 0.88 <= covered["cluster"] / trials <= 0.99
    assert covered["naive"] / trials < 0.5


def test_paired_test_by_slide_is_not_fooled_by_many_tiles():
    """Two encoders right on 13 and 11 of 20 slides (all tiles of a slide alike; each right
    on slides the other gets wrong): 1,000 tiles make the difference look certain, 20 slides
    do not."""
    slides = np.repeat(np.arange(20), 50)
    y = np.zeros(len(slides), int)
    a = np.where(np.isin(slides, np.arange(13)), 0, 1)
    b = np.where(np.isin(slides, np.arange(3, 14)), 0, 1)

    def accuracy(idx, pred):
        return float((pred[idx] == y[idx]).mean())

    naive = paired_bootstrap(accuracy, a, b, n=500)
    cluster = paired_bootstrap(accuracy, a, b, n=500, groups=slides)
    assert naive["difference"] == cluster["difference"] == pytest.approx(0.1)
    assert naive["p_value"] < 0.01 and cluster["p_value"] > 0.2
    assert cluster["ci"][0] < 0 < cluster["ci"][1]
