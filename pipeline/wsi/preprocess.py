"""``cpath preprocess``: tissue detection and tiling at a physical resolution."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.planned import not_available


@dataclass
class PreprocessConfig:
    """Detect tissue and tile every slide at a target resolution (mpp)."""

    slides: str = ""  # folder, glob or CSV list of slides
    out: Path = Path("runs/preprocess")
    mpp: float | None = 0.5
    tile_size: int = 256
    overlap: int = 0
    min_tissue: float = 0.5
    workers: int = 1
    shard: str | None = None


def run(cfg: PreprocessConfig) -> None:
    raise not_available("preprocess")
