"""Per-tile sampling weights that balance clusters (Vo et al., 2024, Sec. 3.2, "balanced
sampling"; the rebalancing of RudolfV, Dippel et al., 2024).

Hierarchical sampling draws a top-level cluster uniformly, then one of its child clusters
uniformly, and so on down to a tile of a level-0 cluster, uniformly. The weights here are
that procedure's probability of each tile (sampling with replacement, so in expectation
rather than the reference's sampling without replacement of a fixed subset): every
top-level cluster gets ``1 / K`` of the mass, shared equally by its child clusters, down
to the tiles of each level-0 cluster. With one level it is ``1 / (K * size of the tile's
cluster)``.

Group weights then set each metadata group's total share (``shares[g] / sum(shares)``,
equal by default) while the tiles within a group keep their proportions: a tile's weight
is multiplied by ``share of its group / mass of its group``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Weights (``N``, float64, summing to 1) of tiles with cluster ids ``labels`` (``N x L``,
    level 0 finest, level ``L - 1`` the top) that make every top-level cluster equally
    likely, every child cluster equally likely within its parent, and every tile equally
    likely within its level-0 cluster. Cluster ids of a level must each have one parent
    (as :func:`pipeline.curation.kmeans.hierarchical_kmeans` gives)."""
    labels = np.asarray(labels, np.int64)
    if labels.ndim == 1:
        labels = labels[:, None]  # N x 1
    n, levels = labels.shape
    if n == 0:
        return np.zeros(0)
    _, top = np.unique(labels[:, -1], return_inverse=True)
    weights = np.full(n, 1.0 / (top.max() + 1))  # N: share of the tile's top cluster
    for level in range(levels - 2, -1, -1):
        pairs = np.unique(labels[:, level : level + 2], axis=0)  # P x 2: (child, parent)
        parents, children = np.unique(pairs[:, 1], return_counts=True)
        weights /= children[np.searchsorted(parents, labels[:, level + 1])]
    _, finest, sizes = np.unique(labels[:, 0], return_inverse=True, return_counts=True)
    return weights / sizes[finest]


def group_balanced(
    weights: np.ndarray, groups: Sequence[str] | np.ndarray, shares: Mapping[str, float] | None
) -> np.ndarray:
    """``weights`` (``N``) rescaled so that each group of ``groups`` (``N`` names) holds
    ``shares[g] / sum of shares`` of the mass (every group alike when ``shares`` is None),
    the proportions within a group unchanged. Sums to 1."""
    weights = np.asarray(weights, np.float64)
    names, index = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    if shares is None:
        target = np.ones(len(names))
    else:
        missing = [g for g in names if g not in shares]
        if missing:
            raise ValueError(f"no weight for groups {missing[:5]}")
        target = np.array([float(shares[g]) for g in names])
    if (target < 0).any() or not np.isfinite(target).all() or target.sum() <= 0:
        raise ValueError(f"group weights must be >= 0 and not all 0, got {target.tolist()}")
    mass = np.bincount(index, weights=weights, minlength=len(names))  # G
    if (mass[target > 0] <= 0).any():
        empty = names[(mass <= 0) & (target > 0)].tolist()
        raise ValueError(f"groups {empty[:5]} have a weight but no tile with a weight")
    scale = np.divide(target / target.sum(), mass, out=np.zeros(len(names)), where=mass > 0)
    return weights * scale[index]
