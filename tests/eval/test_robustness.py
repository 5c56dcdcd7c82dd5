"""The robustness probes of tile tasks against direct computations: the site probe on
held-out slides, its sampled silhouette, and the PathoROB robustness index."""

import numpy as np
import pytest
from sklearn.metrics import silhouette_score

from pipeline.eval.robustness import leakage_probe, leakage_splits, robustness_index


def _fingerprinted(seed: int = 0, slides: int = 24, per_slide: int = 20, dim: int = 16):
    """Tiles whose features identify their slide (a random offset per slide) but carry no
    site: the site is assigned to slides at random (4 sites, 6 slides each)."""
    rng = np.random.default_rng(seed)
    slide = np.repeat(np.arange(slides), per_slide)
    site = np.repeat(rng.permutation(np.arange(slides) % 4), per_slide)
    x = rng.normal(size=(slides, dim))[slide] * 3 + rng.normal(size=(len(slide), dim))
    return x, site.astype(str), np.array([f"s{i}" for i in slide])


def test_site_probe_folds_never_split_a_slide_and_ignore_slide_fingerprints():
    x, site, slide = _fingerprinted()
    for train, test in leakage_splits(site, slide, folds=5, seed=0):
        assert not set(slide[train]) & set(slide[test])
        assert set(site[train]) == set(site[test]) == {"0", "1", "2", "3"}
    leak = leakage_probe(x, site, slide, seed=0)
    # shuffled tile folds would learn each slide's offset and recall its site (~1.0);
    # on held-out slides the features tell nothing about the site
    assert leak["chance"] == 0.25 and leak["sites"] == 4 and leak["groups"] == 24
    assert leak["balanced_accuracy"] < 0.45
    # a real site effect is found on held-out slides
    shifted = x + np.eye(16)[site.astype(int)] * 12
    assert leakage_probe(shifted, site, slide, seed=0)["balanced_accuracy"] > 0.9


def test_site_probe_leaves_out_sites_of_one_slide():
    x, site, slide = _fingerprinted()
    site = np.where(slide == "s0", "lonely", site)  # the only slide of its site
    leak = leakage_probe(x, site, slide)
    assert leak["sites"] == 4 and leak["tiles"] == len(site) - 20
    assert (
        leakage_probe(x, np.where(site == "0", "0", "1"), np.where(site == "0", "a", "b")) is None
    )


def test_site_probe_silhouette_is_computed_on_a_fixed_sample():
    rng = np.random.default_rng(1)
    n = 20_000
    slide = rng.integers(0, 80, n)
    site = (slide % 4).astype(str)
    x = rng.normal(size=(n, 8)) + np.eye(8)[slide % 4]
    leak = leakage_probe(x, site, slide.astype(str), seed=3, sample_size=2000)
    assert leak["silhouette"] == pytest.approx(
        silhouette_score(x, site, sample_size=2000, random_state=3), abs=1e-12
    )
    small = leakage_probe(x[:500], site[:500], slide[:500].astype(str), seed=3)
    assert small["silhouette"] == pytest.approx(silhouette_score(x[:500], site[:500]), abs=1e-12)


def _brute_force(x, labels, confounder, exclude, k):
    """SS, SO, OS, OO counts from the full cosine matrix and a sort of every row."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T  # N x N, float64
    counts = np.zeros(4, int)
    for i in range(len(x)):
        candidates = [j for j in range(len(x)) if j != i and exclude[j] != exclude[i]]
        for j in sorted(candidates, key=lambda j: -sims[i, j])[:k]:
            same_class, same_conf = labels[j] == labels[i], confounder[j] == confounder[i]
            counts[2 * (not same_class) + (not same_conf)] += 1
    return counts  # SS, SO, OS, OO


@pytest.mark.parametrize("by_slide", [True, False])
def test_robustness_index_matches_a_brute_force_count(by_slide):
    rng = np.random.default_rng(2)
    slide = np.repeat(np.arange(12), 7)  # 12 slides at 3 sites, tiles of 3 classes on each
    site = (slide % 3).astype(str)
    labels = rng.integers(0, 3, len(slide)).astype(str)
    x = rng.normal(size=(3, 6))[labels.astype(int)] + rng.normal(size=(3, 6))[slide % 3]
    x += rng.normal(size=x.shape) * 0.8
    exclude = slide if by_slide else np.arange(len(slide))
    expected = _brute_force(x, labels, site, exclude, k=9)
    got = robustness_index(x, labels, site, slide if by_slide else None, k=9)
    assert [got[c] for c in ("ss", "so", "os", "oo")] == expected.tolist()
    assert got["value"] == pytest.approx(expected[1] / (expected[1] + expected[2]))
    assert got["k"] == 9
    chunked = robustness_index(x, labels, site, slide if by_slide else None, k=9, chunk=5)
    assert chunked == got  # similarities computed a few rows at a time: the same counts


def test_robustness_index_pools_counts_over_tiles():
    """Seven tiles on a circle, k = 2; A, B and C see only same-class same-site neighbours
    (they count in neither sum), and the index pools counts rather than averaging ratios."""
    angles = np.radians([0, 12, 30, 100, 115, 205, 215])  # A B C D E F G
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    labels = np.array(list("tttt" + "nnn"))
    site = np.array(list("1112211"))
    got = robustness_index(x, labels, site, k=2)
    # D: E (OS), C (SO); E: D (OS), C (OO); F: G (SS), E (SO); G: F (SS), E (SO)
    assert (got["ss"], got["so"], got["os"], got["oo"]) == (8, 3, 2, 1)
    assert got["value"] == pytest.approx(3 / 5)  # per-tile ratios would average 0.625


def test_class_clustered_features_score_above_site_clustered_ones():
    rng = np.random.default_rng(4)
    slide = np.repeat(np.arange(16), 20)
    site = (slide % 4).astype(str)
    labels = rng.integers(0, 2, len(slide)).astype(str)
    class_dir, site_dir = rng.normal(size=(2, 32)), rng.normal(size=(4, 32))
    noise = rng.normal(size=(len(slide), 32))
    by_class = class_dir[labels.astype(int)] * 3 + site_dir[slide % 4] * 0.5 + noise
    by_site = class_dir[labels.astype(int)] * 0.5 + site_dir[slide % 4] * 3 + noise
    high = robustness_index(by_class, labels, site, slide, k=11)["value"]
    low = robustness_index(by_site, labels, site, slide, k=11)["value"]
    assert high > 0.9 and low < 0.2


def test_robustness_index_needs_a_design_that_can_tell():
    x = np.random.default_rng(0).normal(size=(8, 3))
    one_class_per_site = robustness_index(x, np.array(list("aaaabbbb")), np.array(list("11112222")))
    assert one_class_per_site is None  # OS cannot happen: the index would be 1 by design
    k_capped = robustness_index(
        x, np.array(list("abababab")), np.array(list("11112222")), np.array(list("xxxxyyyy")), k=11
    )
    assert k_capped["k"] == 4  # four tiles outside each tile's slide
