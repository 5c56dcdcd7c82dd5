"""Training monitors: a kNN probe of the teacher on labelled tiles, and crash-safe checkpoints."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pipeline.io import atomic_path
from pipeline.ssl.probe import embed, knn_probe, load_tile_images, read_labelled_tiles

log = logging.getLogger(__name__)


class KNNProbe(L.Callback):
    """Every ``every`` steps (and at the end): kNN balanced accuracy of the teacher's class
    token on a labelled tile set, grouped by slide; logged as ``probe/knn_bacc``. Every rank
    computes it (the forward is collective under FSDP); rank 0 logs it. A probe that cannot
    be scored (too few tiles or slides for its folds) logs a warning and training goes on."""

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

    def probe(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        backbone = module.teacher.backbone
        was_training = backbone.training
        backbone.eval()
        with torch.autocast(
            module.device.type, dtype=torch.bfloat16, enabled=module.device.type == "cuda"
        ):
            feats = embed(backbone, self.images, self.mean, self.std)
        backbone.train(was_training)
        try:  # the same features and folds on every rank: all ranks skip alike
            score = knn_probe(feats, self.labels, self.groups)
        except Exception as exc:  # a monitor must not end a long run (sklearn: ValueError)
            if trainer.is_global_zero:
                log.warning(
                    "kNN probe of %s skipped at step %d: %s", self.path, trainer.global_step, exc
                )
            return
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"probe/knn_bacc": score}, step=trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0:
            self.probe(trainer, module)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written under a temporary name and renamed: a run killed while saving
    never leaves a truncated ``last.ckpt`` to resume from."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
