"""``cpath evaluate``: run a benchmark suite over one or more encoders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.planned import not_available


@dataclass
class EvaluateConfig:
    """Evaluate encoders on a suite of tile- and slide-level tasks."""

    suite: Path | None = None
    encoders: list[str] | None = None
    out: Path = Path("runs/eval")


def run(cfg: EvaluateConfig) -> None:
    raise not_available("evaluate")
