"""Tiny patch-14 pretraining runs in one process on random tiles (no slides): the
checkpoints and logged schedules that the tests of ``--model.init_from`` and of the
post-training preset start from."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import Dataset

from pipeline.ssl.config import DataConfig, LossConfig
from pipeline.ssl.data import MultiCrop, PretrainDataModule
from pipeline.ssl.module import DINOv2Module

TINY14 = {"patch_size": 14, "depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 4}
TINY_HEADS = {"prototypes": 16, "head_hidden": 16, "head_bottleneck": 8, "head_layers": 2}


class RandomTiles(Dataset):
    """``n`` random uint8 tiles of one "slide", cut into the views of ``data``."""

    def __init__(self, data: DataConfig, n: int = 8, side: int | None = None, seed: int = 0):
        side = side or data.global_size
        g = torch.Generator().manual_seed(seed)
        self.tiles = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g)
        self.crop = MultiCrop(data)
        self.slide_sizes = [n]

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int):
        return self.crop(self.tiles[int(index)])


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
    datamodule.dataset = RandomTiles(data, side=data.global_size + 4)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        callbacks=list(callbacks),
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(out / "last.ckpt")
    return out / "last.ckpt"
