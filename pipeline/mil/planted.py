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
- :func:`write_shortcut_cohort` and :func:`shortcut_config`: the shortcut task of masked
  hard instance mining (MHIM-MIL, Tang et al., ICCV 2023): weak evidence in every positive
  bag, and in most training positives also a strong shortcut instance that no test bag has.
- :func:`write_imbalanced_cohort`, :func:`imbalanced_config` and :data:`IMBALANCED_ARMS`:
  the imbalanced three-class task of SC-MIL (Juyal et al., WACV 2024), 10:3:1 among the
  training bags, a balanced test set, and the arms that are compared on it.
- :func:`mixture_bags`: in-memory bags of a three-component Gaussian mixture whose classes
  differ only in one component's variance or only in the proportions, for PANTHER slide
  embeddings (Song et al., CVPR 2024) against mean pooling.
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


def write_bag(root: Path, slide: str, feats: np.ndarray) -> None:
    """``feats`` (``bag x dim``) as ``root/feats/<slide>.h5``, float16 as `cpath extract`
    stores them, with :data:`PLANTED_ENCODER`'s attributes."""
    n, dim = feats.shape
    writer = FeatureWriter(
        root / "feats" / f"{slide}.h5", n, dim, np.zeros((n, 2)), PLANTED_ENCODER
    )
    writer.write(feats, 0)
    writer.close()


def write_tables(root: Path, rows: list[dict], split: list[dict]) -> None:
    """``labels.csv`` (``rows``) and ``splits.csv`` (``split``) under ``root``."""
    for name, table in (("labels.csv", rows), ("splits.csv", split)):
        with open(root / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)


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
            write_bag(root, slide, feats)
            rows.append({"slide_id": slide, "case_id": slide, "label": f"k{c:02d}"})
            split.append({**rows[-1], "fold_0": "train" if i < n_train else "test"})
    write_tables(root, rows, split)
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


def write_shortcut_cohort(
    root: str | Path,
    seed: int = 0,
    n_train: int = 60,
    n_test: int = 40,
    bag: int = 16,
    dim: int = 8,
    hard: float = 2.0,
    evidence: int = 3,
    easy: float = 8.0,
    shortcut_share: float = 0.7,
) -> Path:
    """Write the shortcut task of MHIM-MIL under ``root`` (files as :func:`write_cohort`'s):
    ``n_train`` training and ``n_test`` test bags of ``bag`` instances in ``dim``
    dimensions, every second one positive (label 1, else 0). A positive bag's first
    ``evidence`` instances are shifted by ``hard`` along the first axis (weak "hard"
    evidence); in a share ``shortcut_share`` of the training positives (drawn), the next
    instance is also shifted by ``easy`` along the second axis: a shortcut that a plain
    model leans on and that no test bag has. Returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "feats").mkdir(parents=True, exist_ok=True)
    axes = np.eye(dim)
    rows, split = [], []
    for i in range(n_train + n_test):
        train, positive = i < n_train, i % 2 == 1
        feats = rng.normal(size=(bag, dim)).astype(np.float32)
        if positive:
            feats[:evidence] += hard * axes[0]
            if train and rng.random() < shortcut_share:
                feats[evidence] += easy * axes[1]
        slide = f"s{i:03d}"
        write_bag(root, slide, feats)
        rows.append({"slide_id": slide, "case_id": f"c{i:03d}", "label": int(positive)})
        split.append({**rows[-1], "fold_0": "train" if train else "test"})
    write_tables(root, rows, split)
    return root


def shortcut_config(root: str | Path, out: str | Path, seed: int, **overrides) -> TrainMILConfig:
    """Train-mil settings for a cohort of :func:`write_shortcut_cohort`: those of
    :func:`train_config` with 12 epochs at lr 2e-3, one bag per step and dropout 0.1 (plain
    ABMIL; ``strategy="mhim", teacher_init=<a plain run>`` for MHIM-MIL)."""
    settings = {
        "epochs": 12,
        "lr": 2e-3,
        "batch_size": 1,
        "model_args": {"hidden": 32, "attn_dim": 16, "dropout": 0.1},
        **overrides,
    }
    return train_config(root, out, seed, **settings)


def write_imbalanced_cohort(
    root: str | Path,
    seed: int = 0,
    n_train: tuple[int, ...] = (100, 30, 10),
    n_test: int = 20,
    bag: int = 16,
    dim: int = 8,
    shift: float = 2.0,
    evidence: int = 3,
) -> Path:
    """Write the imbalanced task of SC-MIL under ``root`` (files as :func:`write_cohort`'s):
    ``n_train[c]`` training bags of class ``k<c>`` (10:3:1 by default) and ``n_test`` test
    bags of each class, of ``bag`` instances in ``dim`` dimensions; in a bag of class ``c``,
    ``evidence`` instances are shifted by ``shift`` along axis ``c`` (weak evidence). Returns
    ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    items = [(c, True) for c, n in enumerate(n_train) for _ in range(n)]
    items += [(c, False) for c in range(len(n_train)) for _ in range(n_test)]
    (root / "feats").mkdir(parents=True, exist_ok=True)
    rows, split = [], []
    for i, (c, train) in enumerate(items):
        feats = rng.normal(size=(bag, dim)).astype(np.float32)
        feats[:evidence, c] += shift
        slide = f"s{i:03d}"
        write_bag(root, slide, feats)
        rows.append({"slide_id": slide, "case_id": f"c{i:03d}", "label": f"k{c}"})
        split.append({**rows[-1], "fold_0": "train" if train else "test"})
    write_tables(root, rows, split)
    return root


# the arms compared on the imbalanced task: train-mil settings over imbalanced_config's
IMBALANCED_ARMS = {
    "plain": {"balanced": False},  # cross-entropy on the imbalanced bags
    "weighted": {"balanced": False, "class_weighted": True},  # class-weighted cross-entropy
    # SC-MIL, its cross-entropy term class-weighted as well
    "supcon": {"balanced": False, "class_weighted": True, "strategy": "supcon"},
}


def imbalanced_config(root: str | Path, out: str | Path, seed: int, **overrides) -> TrainMILConfig:
    """Train-mil settings for a cohort of :func:`write_imbalanced_cohort`, the same
    optimisation for every arm of :data:`IMBALANCED_ARMS`: those of :func:`train_config`
    with 40 epochs of batches of 16 at lr 5e-3 and dropout 0.1."""
    settings = {
        "epochs": 40,
        "lr": 5e-3,
        "batch_size": 16,
        "model_args": {"hidden": 32, "attn_dim": 16, "dropout": 0.1},
        **overrides,
    }
    return train_config(root, out, seed, **settings)


# the mixture's component means in 4 dimensions
MIXTURE_CENTRES = np.array([[0.0, 0, 0, 0], [8, 0, 0, 0], [0, 8, 0, 0]])


def mixture_bags(
    seed: int, kind: str, n_per_class: int = 100, n_tiles: int = 120
) -> tuple[list[np.ndarray], list[str]]:
    """``(bags, labels)``: ``n_per_class`` bags of ``n_tiles`` tiles (``n_tiles x 4``,
    shuffled) of each class ``"0"`` and ``"1"``, drawn from a mixture of three unit-variance
    Gaussians at :data:`MIXTURE_CENTRES`. ``kind`` ``variance``: a third of the tiles from
    each component, and component 1's standard deviation is 2 in class 1 (the class means
    are equal, so mean pooling cannot tell the classes apart); ``proportions``: the tiles
    are drawn 0.6 / 0.2 / 0.2 from the components in class 0 and 0.2 / 0.6 / 0.2 in class 1
    (the means differ)."""
    if kind not in ("variance", "proportions"):
        raise ValueError(f"kind must be variance or proportions, got {kind!r}")
    rng = np.random.default_rng(seed)
    bags, labels = [], []
    for label in (0, 1):
        for _ in range(n_per_class):
            if kind == "variance":
                counts = np.full(3, n_tiles // 3)
                std = np.array([1.0, 2.0 if label else 1.0, 1.0])
            else:
                props = [0.6, 0.2, 0.2] if label == 0 else [0.2, 0.6, 0.2]
                counts = rng.multinomial(n_tiles, props)
                std = np.ones(3)
            tiles = [rng.normal(MIXTURE_CENTRES[k], std[k], size=(counts[k], 4)) for k in range(3)]
            bags.append(rng.permutation(np.concatenate(tiles)))
            labels.append(str(label))
    return bags, labels
