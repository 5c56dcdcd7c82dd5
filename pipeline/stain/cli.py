"""``cpath stain``: fit a stain normalizer to a target, apply it, report slide clustering."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.planned import not_available


@dataclass
class StainConfig:
    """Fit and apply stain normalization (Macenko, Reinhard, Vahadane)."""

    action: Literal["fit", "apply", "report"] = "fit"
    method: Literal["macenko", "reinhard", "vahadane"] = "macenko"
    target: Path | None = None  # image to fit the normalizer to
    stain: Path | None = None  # fitted normalizer (JSON) for apply
    input: Path | None = None
    out: Path | None = None


def run(cfg: StainConfig) -> None:
    raise not_available("stain")
