"""Planted check of curated pretraining: does balancing by clusters help the rarest concept?

Synthetic H&E-coloured tiles of 4 textures (axis-aligned stripes, checkerboard, dots,
diagonal stripes; shares 85 / 10 / 4 / 1 %) in 20 "slides". Per seed:

1. a tiny DINOv2 run samples tiles as `cpath pretrain` does without weights (the
   slide-chunked stream, :class:`pipeline.ssl.stream.TileStream`);
2. the pretraining tiles are curated as `cpath curate` does (hierarchical k-means,
   cluster-balanced weights; Vo et al., 2024) on features of a frozen descriptor, a
   40-bin Fourier power spectrum (by radius and orientation) standing in for the stronger
   frozen encoder curation uses in practice (the tiny run's own class tokens do not
   cluster by texture);
3. a second run from scratch, same seed and steps, samples by those weights
   (:class:`pipeline.ssl.stream.WeightedStream`, as `--data.weights`).

Both encoders are then scored by kNN (k = 10, cosine, 5-fold CV) on a balanced labelled set
of fresh tiles (100 per texture): the recall of the rarest texture and the balanced
accuracy. The reference is the unbalanced run of the same seed. Goal: the rarest texture's
recall up by at least 0.05 on average.

Usage: ``python benchmarks/curation.py [--seeds 3] [--steps 300]`` (CPU, about 4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier

from pipeline.curation.kmeans import hierarchical_kmeans
from pipeline.curation.weights import balanced_weights
from pipeline.ssl.config import DataConfig, LossConfig, ModelConfig, OptimConfig
from pipeline.ssl.data import PretrainDataModule, TensorTiles
from pipeline.ssl.module import DINOv2Module
from pipeline.ssl.train import fit_in_process

SHARES = (0.85, 0.10, 0.04, 0.01)
NAMES = ("stripes", "checker", "dots", "diagonal")
SIDE = 40  # px per synthetic tile
TILES = 2000  # pretraining tiles
SLIDES = 20
COLOUR_SD = 12.0  # per-tile colour spread (grey levels)


def pattern(kind: int, rng: np.random.Generator) -> np.ndarray:
    """A ``SIDE x SIDE`` boolean texture of ``kind`` (0 stripes, 1 checkerboard, 2 dots,
    3 diagonal stripes) with a random period and phase: True where the nuclei-like
    foreground is."""
    y, x = np.mgrid[:SIDE, :SIDE].astype(np.float32)  # SIDE x SIDE
    period, phase = rng.uniform(6, 10), rng.uniform(0, 2 * np.pi)
    if kind == 0:
        return np.sin(2 * np.pi * x / period + phase) > 0
    if kind == 1:
        return (np.sin(2 * np.pi * x / period + phase) > 0) ^ (np.sin(2 * np.pi * y / period) > 0)
    if kind == 2:
        cy, cx = rng.uniform(0, SIDE, (2, 12))
        d = np.min((y[..., None] - cy) ** 2 + (x[..., None] - cx) ** 2, axis=-1)
        return d < rng.uniform(4, 9)
    return np.sin(2 * np.pi * (x + y) / (period * 1.41) + phase) > 0


def texture(kind: int, rng: np.random.Generator) -> np.ndarray:
    """One ``3 x SIDE x SIDE`` uint8 tile: a texture of ``kind`` in random H&E-like colours."""
    fg = pattern(kind, rng)
    pink = np.array([230, 150, 190]) + rng.normal(0, COLOUR_SD, 3)  # background (eosin)
    purple = np.array([120, 60, 150]) + rng.normal(0, COLOUR_SD, 3)  # foreground (haematoxylin)
    image = np.where(fg[None], purple[:, None, None], pink[:, None, None])  # 3 x S x S
    image = image + rng.normal(0, 10, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def spectrum(tiles: torch.Tensor) -> np.ndarray:
    """``N x 40`` log power spectrum of the grey tiles, summed in 5 radius x 8 orientation
    bins."""
    grey = tiles.float().mean(1).numpy()  # N x S x S
    grey = grey - grey.mean((1, 2), keepdims=True)
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey), axes=(1, 2))) ** 2  # N x S x S
    y, x = np.mgrid[:SIDE, :SIDE] - SIDE // 2
    radius = np.clip((np.hypot(x, y) / (SIDE / 2) * 5).astype(int), 0, 4)
    angle = (np.mod(np.arctan2(y, x), np.pi) / np.pi * 8).astype(int) % 8
    bins = (radius * 8 + angle).ravel()  # S*S
    return np.log1p(np.stack([np.bincount(bins, weights=p.ravel(), minlength=40) for p in power]))


def tiles_of(kinds: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    return torch.from_numpy(np.stack([texture(int(k), rng) for k in kinds]))  # N x 3 x S x S


def configs(seed: int) -> tuple[ModelConfig, DataConfig, LossConfig, OptimConfig]:
    model = ModelConfig(
        arch="vit_tiny_patch16_224",
        arch_kwargs={"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2},
        layerscale=None,
        drop_path_rate=0.0,
        prototypes=256,
        head_hidden=128,
        head_bottleneck=32,
        head_layers=2,
    )
    data = DataConfig(
        batch_size=32,
        workers=0,
        global_size=32,
        local_size=16,
        local_crops=2,
        global_scale=(0.4, 1.0),
        local_scale=(0.1, 0.4),
        tiles_per_visit=4,
        seed=seed,
    )
    loss = LossConfig(teacher_temp_warmup_steps=50)
    optim = OptimConfig(
        base_lr=0.004, warmup_steps=20, freeze_last_layer_steps=10, momentum_teacher=0.99
    )
    return model, data, loss, optim


def pretrain(tiles: torch.Tensor, weights: np.ndarray | None, seed: int, steps: int, out: Path):
    """A tiny DINOv2 run on ``tiles`` (by ``weights`` if given); returns its module."""
    model, data, loss, optim = configs(seed)
    torch.manual_seed(seed)
    module = DINOv2Module.from_configs(model, loss, optim, steps)
    datamodule = PretrainDataModule(data, loss, patch_size=8, max_steps=steps)
    datamodule.dataset = TensorTiles(tiles, data, [len(tiles) // SLIDES] * SLIDES, weights)
    fit_in_process(module, datamodule, steps, out)
    return module


@torch.inference_mode()
def features(module: DINOv2Module, tiles: torch.Tensor) -> np.ndarray:
    """Teacher class tokens (``N x D``) of the central 32 px of ``tiles``."""
    _, data, _, _ = configs(0)
    mean = torch.tensor(data.mean)[:, None, None]
    std = torch.tensor(data.std)[:, None, None]
    off = (SIDE - 32) // 2
    x = (tiles[:, :, off : off + 32, off : off + 32].float() / 255 - mean) / std
    backbone = module.teacher.backbone.eval()
    return torch.cat([backbone(x[i : i + 256])[0] for i in range(0, len(x), 256)]).numpy()


def knn_scores(feats: np.ndarray, labels: np.ndarray, seed: int) -> tuple[float, float]:
    """(recall of the rarest texture, balanced accuracy) of a cross-validated kNN."""
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    pred = cross_val_predict(KNeighborsClassifier(10), feats, labels, cv=cv)
    recall = [float((pred[labels == c] == c).mean()) for c in range(len(SHARES))]
    return recall[-1], float(np.mean(recall))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--clusters", type=int, nargs="+", default=[64, 8])
    args = parser.parse_args()
    torch.set_num_threads(1)  # ops this small run slower on threads that share cores
    rows = []
    for seed in range(args.seeds):
        start = time.perf_counter()
        rng = np.random.default_rng(seed)
        kinds = rng.permutation(np.repeat(np.arange(4), [int(s * TILES) for s in SHARES]))
        tiles = tiles_of(kinds, rng)  # TILES x 3 x SIDE x SIDE
        test_kinds = np.repeat(np.arange(4), 100)
        test = tiles_of(test_kinds, rng)
        with tempfile.TemporaryDirectory() as tmp:
            plain = pretrain(tiles, None, seed, args.steps, Path(tmp))
            x = spectrum(tiles)  # TILES x 40
            x = (x - x.mean(0)) / x.std(0)
            tree = hierarchical_kmeans(x, args.clusters, seed=seed, n_init=3, backend="sklearn")
            weights = balanced_weights(tree.labels)  # TILES
            curated = pretrain(tiles, weights, seed, args.steps, Path(tmp))
        rare_share = float(weights[kinds == 3].sum())
        before = knn_scores(features(plain, test), test_kinds, seed)
        after = knn_scores(features(curated, test), test_kinds, seed)
        rows.append((seed, rare_share, *before, *after, time.perf_counter() - start))
        print(
            f"seed {seed}: rarest texture {SHARES[-1]:.0%} of tiles -> {rare_share:.1%} of the "
            f"weighted stream; kNN recall of it {before[0]:.3f} -> {after[0]:.3f}, balanced "
            f"accuracy {before[1]:.3f} -> {after[1]:.3f} ({rows[-1][-1]:.0f} s)",
            flush=True,
        )
    print()
    print(
        "| seed | rarest texture's share of the stream | kNN recall, rarest: plain | curated | "
        "delta | balanced accuracy: plain | curated |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for seed, share, r0, b0, r1, b1, _ in rows:
        print(
            f"| {seed} | {share:.1%} | {r0:.3f} | {r1:.3f} | {r1 - r0:+.3f} | {b0:.3f} | {b1:.3f} |"
        )
    delta = statistics.mean(r[4] - r[2] for r in rows)
    balanced = statistics.mean(r[5] - r[3] for r in rows)
    print(
        f"\nmean change of the rarest texture's kNN recall: {delta:+.3f} (goal >= +0.05); "
        f"of the balanced accuracy: {balanced:+.3f}"
    )


if __name__ == "__main__":
    main()
