"""Cluster-balanced weights, group shares, and the weighted stream that draws by them."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.curation.weights import balanced_weights, group_balanced
from pipeline.ssl.data import StreamSampler
from pipeline.ssl.stream import WeightedStream

SHARES = (0.80, 0.10, 0.05, 0.05)


def planted_labels(n: int = 1000, seed: int = 0) -> np.ndarray:
    """``n`` tiles in clusters of 80/10/5/5 %, shuffled (so every slide mixes them)."""
    labels = np.repeat(np.arange(4), [int(s * n) for s in SHARES])
    return np.random.default_rng(seed).permutation(labels)


def test_one_level_weights_are_one_over_k_times_the_cluster_size():
    labels = np.array([0] * 8 + [1] * 1 + [2] * 1)
    w = balanced_weights(labels)
    np.testing.assert_allclose(w, [1 / 24] * 8 + [1 / 3, 1 / 3])
    np.testing.assert_allclose(w.sum(), 1.0)


def test_two_levels_split_a_top_cluster_equally_among_its_children():
    # top cluster 0 has children 0 (6 tiles) and 1 (2 tiles); top cluster 1 has child 2 (2)
    labels = np.array([[0, 0]] * 6 + [[1, 0]] * 2 + [[2, 1]] * 2)
    w = balanced_weights(labels)
    np.testing.assert_allclose(w, [0.5 / 2 / 6] * 6 + [0.5 / 2 / 2] * 2 + [0.5 / 2] * 2)


def test_group_shares_multiply_as_documented():
    w = np.array([0.1, 0.1, 0.2, 0.6])  # group a holds 0.2, group b 0.8
    groups = ["a", "a", "b", "b"]
    equal = group_balanced(w, groups, None)  # each group 1/2, proportions within kept
    np.testing.assert_allclose(equal, [0.25, 0.25, 0.125, 0.375])
    shares = group_balanced(w, groups, {"a": 3, "b": 1})  # a: 3/4, b: 1/4
    np.testing.assert_allclose(shares, [0.375, 0.375, 0.0625, 0.1875])
    np.testing.assert_allclose(group_balanced(w, groups, {"a": 1, "b": 0}), [0.5, 0.5, 0, 0])
    with pytest.raises(ValueError, match="no weight for groups"):
        group_balanced(w, groups, {"a": 1})


def draws(stream: WeightedStream, n: int = 10_000) -> np.ndarray:
    return stream(np.arange(n))


@pytest.mark.parametrize("per_visit", [1, 4])
def test_the_stream_draws_every_cluster_a_quarter_of_the_time(per_visit):
    labels = planted_labels()
    sizes = [100] * 10  # 10 slides of 100 tiles
    stream = WeightedStream(sizes, balanced_weights(labels), per_visit=per_visit, seed=1)
    share = np.bincount(labels[draws(stream)], minlength=4) / 10_000
    assert np.abs(share - 0.25).max() < 0.03, share
    plain = np.bincount(labels, minlength=4) / len(labels)  # without weights: 80/10/5/5
    np.testing.assert_allclose(plain, SHARES)


def test_the_stream_is_a_function_of_the_seed():
    labels = planted_labels()
    w = balanced_weights(labels)
    a, b = WeightedStream([100] * 10, w, 4, seed=7), WeightedStream([100] * 10, w, 4, seed=7)
    np.testing.assert_array_equal(draws(a), draws(b))
    assert (draws(a) != draws(WeightedStream([100] * 10, w, 4, seed=8))).mean() > 0.9
    # a visit stays on one slide
    slides = draws(a).reshape(-1, 4) // 100
    assert (slides == slides[:, :1]).all()


def test_zero_weight_tiles_and_slides_are_never_drawn():
    w = np.ones(30)
    w[10:20] = 0.0  # slide 1 has no mass
    w[25:] = 0.0  # the end of slide 2 has none
    tiles = WeightedStream([10, 10, 10], w, 2, seed=3)(np.arange(5000))
    assert not ((tiles >= 10) & (tiles < 20)).any() and not (tiles >= 25).any()
    assert set(np.unique(tiles)) == set(range(10)) | set(range(20, 25))
    with pytest.raises(ValueError, match="not all 0"):
        WeightedStream([2], [0.0, 0.0])


def test_resumption_and_two_ranks_read_the_same_positions():
    labels = planted_labels(400)
    stream = WeightedStream([50] * 8, balanced_weights(labels), per_visit=4, seed=5)
    batch, steps = 8, 12
    whole = list(StreamSampler(stream, batch, steps))
    head = list(StreamSampler(stream, batch, 5))  # 5 steps, stopped
    tail = list(StreamSampler(stream, batch, steps, start=5 * batch, done=5))
    assert head + tail == whole
    # two ranks of batch 4 read the same global batches of 8
    ranks = [list(StreamSampler(stream, 4, steps, rank=r, world=2)) for r in range(2)]
    merged = [
        i for step in range(steps) for r in range(2) for i in ranks[r][4 * step : 4 * step + 4]
    ]
    assert merged == whole
    # resumed on 2 ranks after 5 steps on one
    resumed = [
        list(StreamSampler(stream, 4, steps, rank=r, world=2, start=5 * batch, done=5))
        for r in range(2)
    ]
    merged = [
        i
        for step in range(steps - 5)
        for r in range(2)
        for i in resumed[r][4 * step : 4 * step + 4]
    ]
    assert head + merged == whole
