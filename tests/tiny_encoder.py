"""A tiny exported ViT for tests: the smallest encoder every stage can load."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import timm
import torch

from pipeline.ssl.export import save_encoder

ARCH = "vit_tiny_patch16_224"
TINY = {
    "num_classes": 0,
    "img_size": 64,
    "patch_size": 16,
    "depth": 2,
    "embed_dim": 48,
    "num_heads": 2,
}


def save_tiny_encoder(
    folder: Path,
    seed: int = 0,
    edit: Callable[[dict], dict] | None = None,
    extra: dict | None = None,
    **overrides,
) -> Path:
    """Export a random-init tiny ViT (``TINY``, with ``overrides``) to ``folder``; ``edit``
    may change its state dict first, ``extra`` adds keys to its config.json. Returns the
    folder."""
    kwargs = {**TINY, **overrides}
    torch.manual_seed(seed)
    state = timm.create_model(ARCH, **kwargs).state_dict()
    if edit is not None:
        state = edit(state)
    return save_encoder(state, ARCH, kwargs, folder, input_size=kwargs["img_size"], extra=extra)
