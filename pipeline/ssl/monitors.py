"""Training monitors: a kNN probe of the teacher on labelled tiles, a slide-ID kNN of WSI-specific
feature collapse on tiles of the pretraining slides, and crash-safe checkpoints."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pipeline.eval.robustness import robustness_index
from pipeline.io import atomic_path
from pipeline.ssl.probe import (
    embed,
    knn_probe,
    load_tile_images,
    read_labelled_tiles,
    slide_knn_accuracy,
)

log = logging.getLogger(__name__)


def teacher_features(module: L.LightningModule, images: torch.Tensor, mean, std) -> np.ndarray:
    """``N x D`` class tokens of the teacher backbone for ``N x 3 x S x S`` uint8 images (eval
    mode, bf16 autocast on CUDA); every rank calls it (the forward is collective under FSDP)."""
    backbone = module.teacher.backbone
    was_training = backbone.training
    backbone.eval()
    with torch.autocast(
        module.device.type, dtype=torch.bfloat16, enabled=module.device.type == "cuda"
    ):
        feats = embed(backbone, images, mean, std)
    backbone.train(was_training)
    return feats


class KNNProbe(L.Callback):
    """Every ``every`` steps (and at the end): kNN balanced accuracy of the teacher's class
    token on a labelled tile set, grouped by slide, logged as ``probe/knn_bacc``, and the
    PathoROB robustness index of those features with the slide as confounder
    (:func:`pipeline.eval.robustness.robustness_index`: neighbours of the same label from
    other slides against neighbours of another label from the same slide; defined when the
    probe's slides hold tiles of two labels or more) as ``probe/robustness_index``. Every rank computes them (the forward is
    collective under FSDP); rank 0 logs them. A probe that cannot be scored (too few tiles
    or slides for its folds) logs a warning and training goes on."""

    def __init__(self, labelled_tiles: str | os.PathLike, every: int, size: int, mean, std):
        self.path, self.every, self.size, self.mean, self.std = (
            labelled_tiles,
            every,
            size,
            mean,
            std,
        )
        self.images = None

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        tiles, items, self.labels, self.groups = read_labelled_tiles(self.path)
        self.images = load_tile_images(tiles, items, self.size)
        dataset = getattr(getattr(trainer, "datamodule", None), "dataset", None)
        stain = getattr(getattr(dataset, "tiles", None), "stain_norm", None)
        if stain is not None:  # probe tiles as pretraining sees its tiles
            self.images = stain(self.images)

    def probe(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        feats = teacher_features(module, self.images, self.mean, self.std)
        try:  # the same features and folds on every rank: all ranks skip alike
            metrics = {"probe/knn_bacc": knn_probe(feats, self.labels, self.groups)}
        except Exception as exc:  # a monitor must not end a long run (sklearn: ValueError)
            if trainer.is_global_zero:
                log.warning(
                    "kNN probe of %s skipped at step %d: %s", self.path, trainer.global_step, exc
                )
            return
        index = robustness_index(feats, self.labels, self.groups)  # None: one label per slide
        if index is not None:
            metrics["probe/robustness_index"] = index["value"]
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0:
            self.probe(trainer, module)


class SlideKNN(L.Callback):
    """WSI-specific feature collapse, watched during pretraining (EXAPath, Yun et al., 2024):
    every ``every`` steps, the leave-one-out slide-ID kNN accuracy
    (:func:`pipeline.ssl.probe.slide_knn_accuracy`) of the teacher's class tokens on a fixed
    sample of the pretraining tiles, ``tiles`` from each of up to ``slides`` slides (tiles
    with more than ``max_background`` glass skipped). Logged as ``collapse/slide_knn_acc``
    beside its chance level ``collapse/slide_knn_chance`` (the largest slide's share): a
    run whose accuracy climbs towards 1 is clustering tiles by slide. No labels needed.

    The sample is a function of ``seed`` alone, the same on every rank; every rank embeds
    it (collective under FSDP) and rank 0 logs.
    """

    def __init__(
        self,
        every: int,
        slides: int,
        tiles: int,
        size: int,
        mean,
        std,
        k: int = 10,
        max_background: float = 0.7,
        seed: int = 0,
    ):
        self.every, self.slides, self.tiles, self.size, self.k = every, slides, tiles, size, k
        self.mean, self.std, self.max_background, self.seed = mean, std, max_background, seed
        self.images: torch.Tensor | None = None  # N x 3 x size x size uint8
        self.slide_ids: np.ndarray | None = None  # N

    def sample(self, dataset) -> None:
        """Draw the monitor's tiles from a :class:`pipeline.ssl.data.PretrainTiles`."""
        from pipeline.ssl.data import background_share

        tiles = dataset.tiles
        rng = np.random.default_rng(self.seed)
        slide_of = np.searchsorted(tiles.offsets, dataset.items, side="right") - 1  # per item
        present = np.unique(slide_of)
        chosen = np.sort(rng.choice(present, min(self.slides, len(present)), replace=False))
        items, ids = [], []
        for s in chosen:
            candidates = rng.permutation(dataset.items[slide_of == s])
            kept = 0
            for item in candidates[: 4 * self.tiles]:  # glass tiles are passed over
                if background_share(torch.from_numpy(tiles.read(int(item)))) > self.max_background:
                    continue
                items.append(int(item))
                ids.append(int(s))
                kept += 1
                if kept == self.tiles:
                    break
        images = load_tile_images(tiles, items, self.size) if items else torch.zeros(0)
        if tiles.stain_norm is not None and len(images):  # as pretraining sees its tiles
            images = tiles.stain_norm(images)
        self.images, self.slide_ids = images, np.array(ids, dtype=np.int64)

    def measure(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.images is None:  # drawn at the first measurement: short runs never pay
            self.sample(trainer.datamodule.dataset)
            if len(np.unique(self.slide_ids)) < 2:
                self.every = 0
                if trainer.is_global_zero:
                    log.warning(
                        "slide-ID kNN monitor off: it needs tissue tiles of 2 slides or more"
                    )
                return
        feats = teacher_features(module, self.images, self.mean, self.std)
        accuracy = slide_knn_accuracy(feats, self.slide_ids, self.k)
        chance = float(np.bincount(self.slide_ids).max() / len(self.slide_ids))
        if trainer.is_global_zero:
            metrics = {"collapse/slide_knn_acc": accuracy, "collapse/slide_knn_chance": chance}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0:
            self.measure(trainer, module)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written under a temporary name and renamed: a run killed while saving
    never leaves a truncated ``last.ckpt`` to resume from."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
