"""Synthetic cohorts with a planted signal, to check that a MIL method does what it claims.

Each cohort is written as `cpath extract` writes one (a folder of ``<slide_id>.h5`` feature
files with their encoder attributes) with a labels CSV and a one-fold splits CSV, so
``cpath train-mil --features ROOT/feats --labels ROOT/labels.csv --splits ROOT/splits.csv
--folds 1`` trains on it like on real slides. A bag is ``bag`` instances of
``N(0, I_d)`` noise; ``evidence`` of them are shifted by ``shift`` along its class's
direction.

- :func:`transfer_directions`: latent directions shared by a source and a target task (or
  not), for the transfer check of Shao et al. (ICML 2025): a 40-class source whose classes
  are pairs of 8 latent directions, and a target whose classes are single latents, of the
  same 8 (related) or of 8 orthogonal ones (unrelated).
- :func:`write_cohort`: the files of one cohort from its class directions.
- :func:`train_config`: the settings that train ABMIL on such a cohort (its one fold, no
  validation split, a small model).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from pipeline.features import FeatureWriter
from pipeline.mil.train import TrainMILConfig

# what the planted feature files say made them (one made-up encoder for every cohort)
PLANTED_ENCODER = {"encoder": "planted", "encoder_sha256": "0" * 64, "pooling": "cls"}


def transfer_directions(dim: int, latents: int = 8, source_classes: int = 40, seed: int = 0):
    """``(related source, unrelated source, target)`` class directions (``classes x dim``,
    unit norm). The latents are orthonormal; a source class is ``(±a ± b) / sqrt(2)`` of two
    latents; the target's classes are its first 4 latents. The related source draws on the
    target's latents, the unrelated one on ``latents`` others orthogonal to them."""
    if dim < 2 * latents:
        raise ValueError(f"dim {dim} must be at least 2 x latents ({2 * latents})")
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    shared, other = basis[:, :latents].T, basis[:, latents : 2 * latents].T  # latents x dim

    def pairs(lat: np.ndarray) -> np.ndarray:
        mix = np.zeros((source_classes, latents))
        for c in range(source_classes):
            picked = rng.choice(latents, 2, replace=False)
            mix[c, picked] = rng.choice([-1.0, 1.0], 2) / np.sqrt(2)
        return mix @ lat  # source_classes x dim

    return pairs(shared), pairs(other), shared[:4]


def write_cohort(
    root: str | Path,
    directions: np.ndarray,
    n_train: int,
    n_test: int,
    shift: float,
    seed: int = 0,
    bag: int = 24,
    evidence: int = 3,
    prefix: str = "s",
) -> Path:
    """Write ``n_train + n_test`` bags per class of ``directions`` (``classes x dim``) under
    ``root``: ``feats/``, ``labels.csv`` (one patient per slide) and ``splits.csv``
    (``fold_0``: train or test). Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "feats").mkdir(parents=True, exist_ok=True)
    dim = directions.shape[1]
    rows, split = [], []
    for c, direction in enumerate(directions):
        for i in range(n_train + n_test):
            slide = f"{prefix}{c:02d}_{i:03d}"
            feats = rng.normal(size=(bag, dim)).astype(np.float32)  # bag x dim
            feats[:evidence] += (shift * direction).astype(np.float32)
            writer = FeatureWriter(
                root / "feats" / f"{slide}.h5", bag, dim, np.zeros((bag, 2)), PLANTED_ENCODER
            )
            writer.write(feats, 0)
            writer.close()
            rows.append({"slide_id": slide, "case_id": slide, "label": f"k{c:02d}"})
            split.append({**rows[-1], "fold_0": "train" if i < n_train else "test"})
    for name, table in (("labels.csv", rows), ("splits.csv", split)):
        with open(root / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    return root


def train_config(root: str | Path, out: str | Path, seed: int, **overrides) -> TrainMILConfig:
    """Train-mil settings for a cohort of :func:`write_cohort` at ``root``: its splits (one
    fold, no validation), ABMIL of hidden size 32, 20 epochs of batches of 8 at lr 1e-2, on
    the CPU, without bootstrap; ``overrides`` replace any of them."""
    root = Path(root)
    settings = {
        "features": root / "feats",
        "labels": root / "labels.csv",
        "splits": root / "splits.csv",
        "out": Path(out),
        "folds": 1,
        "val_share": 0.0,
        "epochs": 20,
        "lr": 1e-2,
        "batch_size": 8,
        "model_args": {"hidden": 32, "attn_dim": 16, "dropout": 0.0},
        "max_instances": None,
        "standardize": False,
        "bootstrap": 0,
        "progress": False,
        "device": "cpu",
        "seed": seed,
        **overrides,
    }
    return TrainMILConfig(**settings)
