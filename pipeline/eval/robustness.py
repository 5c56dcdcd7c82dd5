"""Robustness of frozen tile features to where tiles come from (site, slide).

Two measures, both on the features of a tile task:

- :func:`leakage_probe`: how well a tile's staining site is predicted from its features
  by a linear probe **on slides it never trained on** (folds grouped by slide or
  patient). Shuffled folds over tiles would put tiles of one slide on both sides, and a
  probe could then recognise the slide (its fingerprint) and recall its site; grouped
  folds measure whether the features carry the site itself.
- :func:`slide_knn_entry`: WSI-specific feature collapse (EXAPath, Yun et al., 2024): how
  often a tile's nearest neighbours come from its own slide (leave-one-out slide-ID kNN
  accuracy), beside its chance level.
- :func:`robustness_index`: the robustness index of PathoROB (Kömen et al., "Towards
  Robust Foundation Models for Digital Pathology", 2025; the benchmark code
  ``pathorob/robustness_index``): among each tile's ``k`` nearest neighbours (cosine),
  ``SO`` counts those of the **s**\\ame biological class from an **o**\\ther site and
  ``OS`` those of an **o**\\ther class from the **s**\\ame site; the index is
  ``sum SO / (sum SO + sum OS)`` pooled over all tiles (1: neighbours follow biology,
  0: they follow the site).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import silhouette_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.mil.metrics import balanced_accuracy

SILHOUETTE_SAMPLE = 2000  # tiles the silhouette is computed on (it costs O(N^2))
PATHOROB_K = 11  # PathoROB's neighbours for Camelyon (tumour vs normal across centres)
CHUNK_ELEMENTS = 1 << 22  # similarities held at once: 4M float32 = 16 MiB


def sampled_silhouette(
    x: np.ndarray, clusters: np.ndarray, sample_size: int = SILHOUETTE_SAMPLE, seed: int = 0
) -> float:
    """Silhouette score (Euclidean) of ``N x D`` features with ``clusters``, on a fixed-seed
    sample of ``sample_size`` tiles when there are more: the score costs ``O(N^2)``
    distances, so large tile sets are sampled (sklearn's ``sample_size`` and
    ``random_state``)."""
    if len(x) > sample_size:
        return float(silhouette_score(x, clusters, sample_size=sample_size, random_state=seed))
    return float(silhouette_score(x, clusters))


def leakage_splits(
    sites: np.ndarray, groups: np.ndarray, folds: int = 5, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, test)`` indices of the leakage probe: stratified by site and grouped by
    ``groups`` (each tile's slide or patient), so no slide is on both sides. The number of
    folds is at most the slides of the site with the fewest, so that every site has
    training slides in every fold."""
    per_site = [len(np.unique(groups[sites == s])) for s in np.unique(sites)]
    n = max(2, min(folds, min(per_site)))
    cv = StratifiedGroupKFold(n_splits=n, shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(sites)), sites, groups))


def leakage_probe(
    x: np.ndarray,
    sites: np.ndarray,
    groups: np.ndarray,
    seed: int = 0,
    folds: int = 5,
    sample_size: int = SILHOUETTE_SAMPLE,
) -> dict | None:
    """How well a tile's site is predicted from its ``N x D`` features on held-out slides.

    A standardised logistic-regression probe, cross-validated over folds grouped by
    ``groups`` (slide or patient of each tile; :func:`leakage_splits`). Only sites with
    tiles of two or more slides can be predicted on a slide the probe has not seen, so
    the others are left out; ``None`` when fewer than two sites remain. Returns the pooled
    balanced accuracy (``chance`` = 1 / sites; well above it: the features carry the site,
    a batch effect), the silhouette by site (on a sample of ``sample_size`` tiles) and the
    numbers of tiles, sites, groups and folds used.
    """
    x = np.asarray(x, np.float64)
    sites, groups = np.asarray(sites).astype(str), np.asarray(groups).astype(str)
    kept_sites = [s for s in np.unique(sites) if len(np.unique(groups[sites == s])) >= 2]
    if len(kept_sites) < 2:
        return None
    keep = np.isin(sites, kept_sites)
    x, sites, groups = x[keep], sites[keep], groups[keep]
    predicted = np.empty(len(sites), dtype=sites.dtype)
    splits = leakage_splits(sites, groups, folds, seed)
    for train, test in splits:
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        predicted[test] = probe.fit(x[train], sites[train]).predict(x[test])
    return {
        "balanced_accuracy": balanced_accuracy(sites, predicted),
        "chance": 1 / len(kept_sites),
        "silhouette": sampled_silhouette(x, sites, sample_size, seed),
        "tiles": int(len(sites)),
        "sites": len(kept_sites),
        "groups": int(len(np.unique(groups))),
        "folds": len(splits),
    }


def _unit(x: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """``N x D`` rows scaled to unit L2 norm (zero rows stay zero), float32 on ``device``."""
    t = torch.as_tensor(np.asarray(x, np.float32), device=device)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def robustness_index(
    x: np.ndarray,
    labels: np.ndarray,
    confounder: np.ndarray,
    exclude: np.ndarray | None = None,
    k: int = PATHOROB_K,
    chunk: int | None = None,
    device: str | torch.device = "cpu",
) -> dict | None:
    """PathoROB robustness index of ``N x D`` features (Kömen et al., 2025).

    For every tile, its ``k`` nearest neighbours by cosine similarity (PathoROB: Euclidean
    distance of L2-normalised features, the same order) among the tiles that do not share
    its ``exclude`` group (PathoROB leaves out the query's own slide; ``None``: only the
    tile itself). Each neighbour is ``SS`` (same class, same confounder), ``SO`` (same
    class, other confounder), ``OS`` (other class, same confounder) or ``OO``. The index
    is ``sum SO / (sum SO + sum OS)`` with the counts summed over all tiles (pooled, not a
    mean of per-tile ratios; ``SS`` and ``OO`` neighbours count in neither); 1 means
    neighbours share biology across confounders, 0 that they share the confounder.

    ``labels``: biological class per tile; ``confounder``: its site ("medical centre")
    or, without sites, its slide. ``k`` is capped at the fewest candidates any tile has
    (PathoROB likewise truncates every tile's neighbour list to the shortest); the value
    used is returned as ``k``. Similarities are computed ``chunk`` rows at a time
    (default: about 4M similarities at once), so memory stays bounded for any ``N``.

    Returns ``{"value", "k", "so", "os", "ss", "oo"}`` (neighbour counts), or ``None`` when
    the design cannot tell: no confounder value with tiles of two classes (``OS`` is
    always 0) or no class under two confounder values (``SO`` is always 0).
    """
    labels, confounder = np.asarray(labels).astype(str), np.asarray(confounder).astype(str)
    n = len(labels)
    if len(x) != n or len(confounder) != n:
        raise ValueError(
            f"robustness index: {len(x)} features, {n} labels, {len(confounder)} confounder values"
        )
    pairs = set(zip(labels.tolist(), confounder.tolist(), strict=True))  # (class, confounder)
    mixed_conf = any(sum(cc == c for _, cc in pairs) >= 2 for c in set(confounder.tolist()))
    spread_class = any(sum(yy == y for yy, _ in pairs) >= 2 for y in set(labels.tolist()))
    if not (mixed_conf and spread_class):
        return None
    _, group = np.unique(
        np.arange(n) if exclude is None else np.asarray(exclude).astype(str), return_inverse=True
    )
    k = min(int(k), n - int(np.bincount(group).max()))
    if k < 1:
        return None
    _, y = np.unique(labels, return_inverse=True)
    _, c = np.unique(confounder, return_inverse=True)
    unit = _unit(x, device)  # N x D
    y_t, c_t, g_t = (torch.as_tensor(a, device=device) for a in (y, c, group))
    rows = chunk or max(1, CHUNK_ELEMENTS // n)
    counts = torch.zeros(4, dtype=torch.int64, device=device)  # SS, SO, OS, OO
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        sims = unit[start:stop] @ unit.T  # rows x N
        sims.masked_fill_(g_t[start:stop, None] == g_t[None, :], float("-inf"))
        nearest = sims.topk(k, dim=1).indices  # rows x k
        same_class = y_t[nearest] == y_t[start:stop, None]
        same_conf = c_t[nearest] == c_t[start:stop, None]
        counts += torch.stack(
            [
                (same_class & same_conf).sum(),
                (same_class & ~same_conf).sum(),
                (~same_class & same_conf).sum(),
                (~same_class & ~same_conf).sum(),
            ]
        )
    ss, so, os_, oo = (int(v) for v in counts.cpu())
    value = so / (so + os_) if so + os_ else float("nan")
    return {"value": float(value), "k": k, "so": so, "os": os_, "ss": ss, "oo": oo}


def slide_knn_entry(x: np.ndarray, slides: np.ndarray, k: int = 10) -> dict:
    """``{"accuracy", "chance", "k", "slides"}``: the leave-one-out slide-ID kNN accuracy of
    ``N x D`` features (:func:`pipeline.ssl.probe.slide_knn_accuracy`) and its chance level
    (the largest slide's share of tiles); ``{"skipped": why}`` with fewer than 2 slides."""
    from pipeline.ssl.probe import slide_knn_accuracy

    slides = np.asarray(slides).astype(str)
    _, counts = np.unique(slides, return_counts=True)
    if len(counts) < 2:
        return {"skipped": "needs tiles of two slides or more"}
    if len(x) > SILHOUETTE_SAMPLE:  # an N x N similarity: a fixed-seed sample of tiles
        rows = np.sort(np.random.default_rng(0).choice(len(x), SILHOUETTE_SAMPLE, replace=False))
        x, slides = x[rows], slides[rows]
        _, counts = np.unique(slides, return_counts=True)
    return {
        "accuracy": slide_knn_accuracy(x, slides, k),
        "chance": float(counts.max() / counts.sum()),
        "k": int(min(k, len(slides) - 1)),
        "slides": int(len(counts)),
    }
