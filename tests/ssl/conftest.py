"""Labelled tiles of the demo's real textures: carcinoma (tumour) vs skin (normal)."""

from __future__ import annotations

import pytest
import torch

TINY_VIT = {"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}


@pytest.fixture
def tiny_module():
    """A factory of tiny :class:`DINOv2Module` (ViT of 1 block, 16 wide, 16 px crops, 16
    prototypes) that trains a step in milliseconds; keyword arguments override the loss,
    model and optimizer configs (``loss={...}``, ``model={...}``, ``optim={...}``). Torch runs on one thread meanwhile: ops
    this small are many times slower on threads that share busy cores."""
    from pipeline.ssl.config import LossConfig, ModelConfig, OptimConfig
    from pipeline.ssl.module import DINOv2Module

    def make(
        max_steps: int = 10,
        loss: dict | None = None,
        model: dict | None = None,
        optim: dict | None = None,
    ):
        model_cfg = ModelConfig(
            **{
                "arch": "vit_tiny_patch16_224",
                "arch_kwargs": dict(TINY_VIT),
                "drop_path_rate": 0.0,
                "prototypes": 16,
                "head_hidden": 16,
                "head_bottleneck": 8,
                "head_layers": 2,
                **(model or {}),
            }
        )
        optim = OptimConfig(**{"warmup_steps": 2, "freeze_last_layer_steps": 0, **(optim or {})})
        return DINOv2Module.from_configs(model_cfg, LossConfig(**(loss or {})), optim, max_steps)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny ops only contend on busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
