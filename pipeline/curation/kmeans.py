"""Hierarchical k-means (Vo et al., 2024, "Automatic Data Curation for Self-Supervised
Learning: A Clustering-Based Approach", Sec. 3).

Level 1 clusters the tiles into ``k_1`` clusters; level ``l + 1`` clusters the ``k_l``
centroids of level ``l`` into ``k_{l+1}`` clusters, so each cluster of a level has one
parent above it. A tile's cluster at level ``l + 1`` is the parent of its cluster at level
``l``. Clustering centroids instead of tiles is what makes the upper levels balanced in
concept rather than in tile count: a concept that covers 80% of the tiles but few
level-1 centroids gets few top-level clusters.

Deviations from the reference: the resampling-clustering steps that refine each level
(the paper's ``r`` and its "resampled" k-means) are not done; level 1 may be fitted on a
random sample of the tiles (``fit_tiles``) and every tile is then assigned to its nearest
centroid. faiss runs the k-means when it is importable (``backend="auto"``), scikit-learn
otherwise (``KMeans``; ``MiniBatchKMeans`` above ``MINIBATCH_ABOVE`` points).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

MINIBATCH_ABOVE = 100_000  # scikit-learn: points above which MiniBatchKMeans fits a level
ASSIGN_CHUNK = 65_536  # tiles assigned to their nearest centroid at a time

Backend = Literal["auto", "faiss", "sklearn"]


@dataclass
class Hierarchy:
    """The clusters of every level, finest (level 0) first.

    Attributes:
        labels: ``N x L`` cluster id of each tile at each level.
        centroids: per level, ``k_l x D`` centroids.
        parents: per level but the top, ``k_l`` ids of the parent cluster one level up.
    """

    labels: np.ndarray
    centroids: list[np.ndarray]
    parents: list[np.ndarray]


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _fit(x: np.ndarray, k: int, seed: int, n_init: int, max_iter: int, backend: str):
    """Centroids (``k x D`` float32) and a nearest-centroid function of a k-means of ``x``."""
    if backend == "faiss":
        import faiss

        km = faiss.Kmeans(x.shape[1], k, niter=max_iter, nredo=n_init, seed=seed)
        km.train(np.ascontiguousarray(x, np.float32))

        def assign(rows: np.ndarray) -> np.ndarray:
            _, nearest = km.index.search(np.ascontiguousarray(rows, np.float32), 1)
            return nearest[:, 0].astype(np.int64)

        return km.centroids.astype(np.float32), assign

    from sklearn.cluster import KMeans, MiniBatchKMeans

    if len(x) > MINIBATCH_ABOVE:
        km = MiniBatchKMeans(
            k, n_init=n_init, max_iter=max_iter, batch_size=4096, random_state=seed
        )
    else:
        km = KMeans(k, n_init=n_init, max_iter=max_iter, random_state=seed)
    km.fit(x)
    return km.cluster_centers_.astype(np.float32), lambda rows: km.predict(rows).astype(np.int64)


def hierarchical_kmeans(
    x: np.ndarray,
    clusters: Sequence[int],
    seed: int = 0,
    n_init: int = 1,
    max_iter: int = 100,
    fit_tiles: int | None = None,
    backend: Backend = "auto",
    progress: bool = False,
) -> Hierarchy:
    """Hierarchical k-means of ``N x D`` features ``x`` with ``clusters[l]`` clusters at
    level ``l`` (finest first, strictly decreasing, ``clusters[0] <= N``).

    Args:
        x: ``N x D`` tile features.
        clusters: clusters per level, finest first.
        seed: seed of the sample and of every k-means.
        n_init: k-means restarts per level.
        max_iter: k-means iterations per restart.
        fit_tiles: fit level 0 on a random sample of this many tiles (None: all).
        backend: ``auto`` (faiss when importable, else scikit-learn), ``faiss`` or ``sklearn``.
        progress: a progress bar over the levels and the assignment.
    """
    from tqdm.auto import tqdm

    x = np.ascontiguousarray(x, np.float32)  # N x D
    clusters = [int(k) for k in clusters]
    if not clusters or any(k < 1 for k in clusters):
        raise ValueError(f"clusters per level must be positive, got {clusters}")
    if any(a <= b for a, b in zip(clusters, clusters[1:], strict=False)):
        raise ValueError(f"clusters per level must decrease from the finest, got {clusters}")
    if clusters[0] > len(x):
        raise ValueError(f"{clusters[0]} clusters of {len(x)} tiles")
    if backend == "auto":
        backend = "faiss" if faiss_available() else "sklearn"
    rng = np.random.default_rng(seed)
    fit = x
    if fit_tiles is not None and len(x) > fit_tiles:
        fit = x[np.sort(rng.choice(len(x), fit_tiles, replace=False))]  # fit_tiles x D
    centroids, assign = _fit(fit, clusters[0], seed, n_init, max_iter, backend)
    labels = np.empty((len(x), len(clusters)), np.int64)  # N x L
    starts = range(0, len(x), ASSIGN_CHUNK)
    for start in tqdm(starts, desc="assign tiles", disable=not progress or len(starts) < 2):
        labels[start : start + ASSIGN_CHUNK, 0] = assign(x[start : start + ASSIGN_CHUNK])
    all_centroids, parents = [centroids], []
    for level, k in enumerate(clusters[1:], start=1):
        upper, assign = _fit(all_centroids[-1], k, seed + level, n_init, max_iter, backend)
        parent = assign(all_centroids[-1])  # k_{l-1}
        parents.append(parent)
        all_centroids.append(upper)
        labels[:, level] = parent[labels[:, level - 1]]
    return Hierarchy(labels, all_centroids, parents)
