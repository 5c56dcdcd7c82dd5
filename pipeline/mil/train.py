"""``cpath train-mil``: slide-level MIL training with cross-validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.planned import not_available


@dataclass
class TrainMILConfig:
    """Train a MIL aggregator on per-slide features with k-fold cross-validation."""

    features: Path | None = None
    labels: Path | None = None
    model: str = "abmil"
    task: Literal["classification", "survival"] = "classification"
    folds: int = 5
    out: Path = Path("runs/mil")


def run(cfg: TrainMILConfig) -> None:
    raise not_available("train-mil")
