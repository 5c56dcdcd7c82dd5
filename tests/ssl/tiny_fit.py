"""Tiny patch-14 pretraining runs in one process on random tiles (no slides): the
checkpoints and logged schedules that the tests of ``--model.init_from`` and of the
post-training preset start from."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch

from pipeline.ssl.config import DataConfig, LossConfig
from pipeline.ssl.data import PretrainDataModule, TensorTiles
from pipeline.ssl.module import DINOv2Module
from pipeline.ssl.train import fit_in_process

TINY14 = {"patch_size": 14, "depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 4}
TINY_HEADS = {"prototypes": 16, "head_hidden": 16, "head_bottleneck": 8, "head_layers": 2}


class StepLog(L.Callback):
    """What each step logged (``loss``, ``schedule/*``) and its optimizer groups, by step."""

    def __init__(self):
        self.steps: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        row = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row["groups"] = [dict(g, params=None) for g in trainer.optimizers[0].param_groups]
        self.steps[trainer.global_step - 1] = row

    def finite(self) -> bool:
        return bool(self.steps) and all(math.isfinite(r["loss"]) for r in self.steps.values())


def tiny_data(global_size: int = 28, local_size: int = 14, **kwargs) -> DataConfig:
    return DataConfig(
        batch_size=2,
        workers=0,
        global_size=global_size,
        local_size=local_size,
        local_crops=1,
        **kwargs,
    )


def fit(
    module: DINOv2Module,
    data: DataConfig,
    loss: LossConfig,
    out: Path,
    steps: int,
    callbacks: tuple = (),
) -> Path:
    """Train ``module`` for ``steps`` steps as ``pipeline.ssl.train`` does (one CPU process,
    32-bit) and write ``out/last.ckpt``, a ``cpath pretrain`` checkpoint."""
    patch = module.student.backbone.patch_size
    datamodule = PretrainDataModule(data, loss, patch_size=patch, max_steps=steps)
    side = data.global_size + 4
    tiles = torch.randint(
        0, 256, (8, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    datamodule.dataset = TensorTiles(tiles, data)  # 8 random tiles of one "slide"
    trainer = fit_in_process(module, datamodule, steps, out, callbacks)
    trainer.save_checkpoint(out / "last.ckpt")
    return out / "last.ckpt"
