"""Tile-level probes of frozen features: kNN and logistic regression, grouped by slide.

Used during pretraining (a kNN probe of the teacher on a small labelled tile set) and
to compare encoders. Cross-validation folds never split a slide, so a probe cannot
score by recognising the slide.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.data.tiles import TileDataset
from pipeline.errors import PipelineError
from pipeline.mil.metrics import balanced_accuracy


def read_labelled_tiles(
    path: str | os.PathLike,
) -> tuple[TileDataset, list[int], np.ndarray, np.ndarray]:
    """``(tiles, item indices, labels, groups)`` from a CSV with coords,index,label[,slide_id]."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        files = sorted({r["coords"] for r in rows})
        tiles = TileDataset([Path(f) if Path(f).is_absolute() else path.parent / f for f in files])
        slot = {f: i for i, f in enumerate(files)}
        items = [int(tiles.offsets[slot[r["coords"]]]) + int(r["index"]) for r in rows]
        labels = np.array([r["label"] for r in rows])
        groups = np.array([r.get("slide_id") or r["coords"] for r in rows])
    except (OSError, KeyError, ValueError) as exc:
        raise PipelineError(
            f"{path}: not a labelled-tiles CSV (coords,index,label): {exc}"
        ) from exc
    if len(rows) == 0:
        raise PipelineError(f"{path}: no labelled tiles")
    return tiles, items, labels, groups


def load_tile_images(tiles: TileDataset, items: list[int], size: int) -> torch.Tensor:
    """``N x 3 x size x size`` uint8: each tile resized to ``size``."""
    out = []
    for i in items:
        tile = torch.from_numpy(tiles.read(i))[None].float()
        if tile.shape[-1] != size:
            tile = F.interpolate(tile, size=(size, size), mode="bilinear", antialias=True)
        out.append(tile.round().clamp(0, 255).to(torch.uint8))
    tiles.close()
    return torch.cat(out)


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor, mean, std, batch: int = 64) -> np.ndarray:
    """``N x D`` float32 features of ``N x 3 x H x W`` uint8 images."""
    device = next(model.parameters()).device
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    feats = []
    for i in range(0, len(images), batch):
        x = (images[i : i + batch].to(device).float() / 255 - m) / s
        out = model(x)
        feats.append((out[0] if isinstance(out, tuple) else out).float().cpu())
    return torch.cat(feats).numpy()


def _folds(groups: np.ndarray, folds: int) -> GroupKFold:
    return GroupKFold(n_splits=max(2, min(folds, len(np.unique(groups)))))


def knn_probe(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int = 20, folds: int = 5
) -> float:
    """Balanced accuracy of a cosine kNN classifier, cross-validated by slide group; ``k`` is
    capped by the size of each training fold (as in ``pipeline.eval.protocols.knn``)."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)  # N x D
    pred = np.empty_like(labels)
    for train, test in _folds(groups, folds).split(x, labels, groups):
        knn = KNeighborsClassifier(
            n_neighbors=min(k, len(train)), metric="cosine", weights="distance"
        )
        pred[test] = knn.fit(x[train], labels[train]).predict(x[test])
    return balanced_accuracy(labels, pred)


def slide_knn_accuracy(
    features: np.ndarray | torch.Tensor, slides: np.ndarray, k: int = 10
) -> float:
    """Share of tiles whose slide is the majority slide of their ``k`` nearest other tiles
    (cosine similarity, leave-one-out over all tiles): a measure of WSI-specific feature
    collapse (EXAPath, Yun et al., 2024), features that cluster by the slide a tile comes
    from rather than by what it shows. Chance is about the largest slide's share of tiles.

    Ties of votes go to the slide of the most similar neighbour among the tied ones. ``k``
    is capped at ``N - 1``. Memory: one ``N x N`` similarity matrix (monitor sets are small).
    """
    x = torch.as_tensor(np.asarray(features, np.float32))
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)  # N x D
    _, slide = np.unique(np.asarray(slides).astype(str), return_inverse=True)
    n, s = len(x), int(slide.max()) + 1 if len(slide) else 0
    if n < 2 or s < 2:
        raise ValueError(f"slide kNN needs tiles of 2 slides or more ({n} tiles, {s} slides)")
    sims = x @ x.T  # N x N
    sims.fill_diagonal_(float("-inf"))  # leave one out
    top, nearest = sims.topk(min(k, n - 1), dim=1)  # N x k
    neighbour_slide = torch.as_tensor(slide)[nearest]  # N x k
    votes = torch.zeros(n, s).scatter_add_(1, neighbour_slide, torch.ones_like(top))  # N x S
    closest = torch.full((n, s), -2.0).scatter_reduce_(1, neighbour_slide, top, "amax")
    score = votes + (closest + 1) / 4  # a tie-break below one vote (similarity in [-1, 1])
    return float((score.argmax(dim=1).numpy() == slide).mean())


def linear_probe(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, c: float = 1.0, folds: int = 5
) -> float:
    """Balanced accuracy of standardised logistic regression (L-BFGS), cross-validated by slide."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    pred = cross_val_predict(clf, features, labels, groups=groups, cv=_folds(groups, folds))
    return balanced_accuracy(labels, pred)
