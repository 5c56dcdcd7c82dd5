"""How strongly tiles cluster by slide: the "WSI-specific feature collapse" check.

Two measures on per-tile descriptors of tiles from several slides: the cross-validated
accuracy of a linear probe that predicts the slide from a tile's descriptor (chance =
1 / slides), and the silhouette score with slides as clusters (-1..1, higher = tighter by
slide). The descriptors are either colour statistics (:func:`colour_features`: what stain
normalization acts on) or the features of an encoder (:func:`encoder_features`: what
downstream models see). Both measures should fall when stain normalization removes
per-slide colour differences.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.eval.robustness import SILHOUETTE_SAMPLE, sampled_silhouette
from pipeline.stain.color import check_batch, rgb_to_lab

COLOUR_STATISTICS = "colour statistics"  # what the report measures without an encoder


def slide_clustering(
    features: np.ndarray,
    slides: np.ndarray,
    folds: int = 5,
    seed: int = 0,
    sample_size: int = SILHOUETTE_SAMPLE,
) -> dict:
    """Slide-ID linear-probe accuracy (k-fold over tiles) and silhouette by slide of
    ``N x D`` features (the silhouette on a fixed-seed sample of ``sample_size`` tiles
    when there are more)."""
    features = np.asarray(features, np.float64)
    slides = np.asarray(slides)
    _, counts = np.unique(slides, return_counts=True)
    if len(counts) < 2:
        raise ValueError("slide clustering needs tiles from at least two slides")
    folds = int(min(folds, counts.min()))
    if folds < 2:
        raise ValueError("every slide needs at least two tiles")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    accuracy = cross_val_score(probe, features, slides, cv=cv).mean()
    return {
        "slide_probe_accuracy": float(accuracy),
        "chance": float(1 / len(counts)),
        "silhouette": sampled_silhouette(features, slides, sample_size, seed),
        "tiles": int(len(slides)),
        "slides": int(len(counts)),
    }


def colour_features(images: torch.Tensor, chunk: int = 32) -> np.ndarray:
    """``B x 12`` colour statistics of tiles: mean and std of RGB and L*a*b* channels."""
    rows = []
    for start in range(0, len(images), chunk):  # cache-sized pieces: far faster on CPU
        x = check_batch(images[start : start + chunk])
        lab = rgb_to_lab(x) / torch.tensor([100.0, 128.0, 128.0]).view(1, 3, 1, 1).to(x)
        parts = [x.mean(dim=(2, 3)), x.std(dim=(2, 3)), lab.mean(dim=(2, 3)), lab.std(dim=(2, 3))]
        rows.append(torch.cat(parts, dim=1).cpu().numpy())
    return np.concatenate(rows)


@torch.inference_mode()
def encoder_features(encoder, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """``B x D`` features of ``B x 3 x H x W`` uint8 tiles from a frozen
    :class:`pipeline.encoders.Encoder` (its pooled output, as ``cpath extract`` stores);
    tiles go to the encoder's device in batches."""
    device = next(encoder.model.parameters()).device
    rows = [
        encoder.embed(images[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(rows).numpy()
