"""Hierarchical k-means recovers planted clusters."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from pipeline.curation.kmeans import hierarchical_kmeans


def planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """4 well-separated Gaussian blobs of 80/10/5/5 % of 2000 points in 16 dimensions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (4, 16)) * 6
    truth = np.repeat(np.arange(4), [1600, 200, 100, 100])
    return centres[truth] + rng.normal(0, 1, (len(truth), 16)), truth


def test_the_top_level_recovers_the_planted_clusters():
    x, truth = planted()
    tree = hierarchical_kmeans(x, [20, 4], seed=0, n_init=3, backend="sklearn")
    assert tree.labels.shape == (2000, 2)
    assert adjusted_rand_score(truth, tree.labels[:, 1]) > 0.9
    assert len(tree.centroids) == 2 and tree.centroids[0].shape == (20, 16)
    # every fine cluster has one parent, and the labels follow it
    np.testing.assert_array_equal(tree.parents[0][tree.labels[:, 0]], tree.labels[:, 1])


def test_fitting_on_a_sample_assigns_every_tile():
    x, truth = planted(1)
    tree = hierarchical_kmeans(x, [12, 4], seed=1, n_init=3, fit_tiles=300, backend="sklearn")
    assert tree.labels[:, 0].max() < 12
    assert adjusted_rand_score(truth, tree.labels[:, 1]) > 0.9


def test_bad_cluster_counts_are_refused():
    x, _ = planted()
    with pytest.raises(ValueError, match="decrease"):
        hierarchical_kmeans(x, [4, 8], backend="sklearn")
    with pytest.raises(ValueError, match="clusters of"):
        hierarchical_kmeans(x[:3], [4], backend="sklearn")
