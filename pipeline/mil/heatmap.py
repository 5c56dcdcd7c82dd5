"""``cpath heatmap``: a trained MIL model's attention over a slide, and its top tiles.

    cpath heatmap --run runs/mil --slide demo_001 --out demo_001_heatmap.png

The model of the fold in which the slide was a test slide (or ``--fold``) scores every
tile of the slide's feature file; scores are turned into percentiles within the slide
(as CLAM draws them), painted tile by tile over the slide thumbnail with a colour bar,
and the ``top_k`` highest-scoring tiles are saved as an image strip (``*_top.png``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class HeatmapConfig:
    """Attention heatmap of a trained MIL model over one slide.

    Args:
        run: a `cpath train-mil` run folder.
        slide: slide id (its feature file and slide are found through the run).
        fold: fold whose model to use (default: the fold that tested this slide).
        out: PNG to write (the top tiles go to <out stem>_top.png).
        top_k: tiles in the strip of highest scores.
        thumbnail_mpp: resolution of the thumbnail (um per px).
        alpha: opacity of the heat overlay.
    """

    run: Path | None = None
    slide: str | None = None
    fold: int | None = None
    out: Path = Path("heatmap.png")
    top_k: int = 8
    thumbnail_mpp: float = 8.0
    alpha: float = 0.5


def run(cfg: HeatmapConfig) -> int:
    from pipeline.mil.drawing import draw_heatmap

    paths = draw_heatmap(cfg)
    print("heatmap: " + "  ".join(str(p) for p in paths))
    return 0
