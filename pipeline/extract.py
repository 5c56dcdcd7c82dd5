"""``cpath extract``: frozen encoder -> per-slide feature files (h5)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.planned import not_available


@dataclass
class ExtractConfig:
    """Extract tile features of every slide with a frozen encoder."""

    coords: Path | None = None  # folder of coords h5 files from `cpath preprocess`
    encoder: str = "timm:vit_small_patch16_224"
    out: Path = Path("features")
    batch_size: int = 256
    workers: int = 2
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    shard: str | None = None


def run(cfg: ExtractConfig) -> None:
    raise not_available("extract")
