"""``cpath pretrain``: DINOv2-style self-supervised pretraining on tiles read from slides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.planned import not_available


@dataclass
class PretrainConfig:
    """Self-supervised pretraining of a timm ViT on tiles read online from slides."""

    coords: Path | None = None  # folder of coords h5 files from `cpath preprocess`
    arch: str = "vit_small_patch16_224"
    out: Path = Path("models/pretrain")
    max_steps: int = 1000
    batch_size: int = 64
    ckpt_path: str | None = None


def run(cfg: PretrainConfig) -> None:
    raise not_available("pretrain")
