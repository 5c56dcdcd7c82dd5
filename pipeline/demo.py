"""``cpath demo``: the whole pipeline on the demo cohort built from real H&E texture."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import save_config
from pipeline.data.demo import describe_cohort, make_cohort
from pipeline.errors import PipelineError
from pipeline.wsi.preprocess import PreprocessConfig, preprocess

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Build the demo cohort (if missing) and run every available stage on it.

    Args:
        data: cohort folder (slides/, ground_truth/, labels.csv, cohort.json).
        cache: folder of the downloaded real texture sources.
        runs: folder of the stage outputs.
        n_slides: slides in the cohort (half tumour, half normal).
        seed: random seed; the cohort is deterministic for a seed.
        size_scale: physical extent of the slides (1.0: about 2-6 mm a side).
        workers: processes that generate and preprocess slides.
        make_data: only build the cohort, run no stage.
    """

    data: Path = Path("data/demo")
    cache: Path = Path("data/cache")
    runs: Path = Path("runs/demo")
    n_slides: int = 32
    seed: int = 0
    size_scale: float = 1.0
    workers: int = 2
    make_data: bool = False


def run(cfg: DemoConfig) -> None:
    start = time.perf_counter()
    log.info("demo cohort: %s (%d slides, seed %d)", cfg.data, cfg.n_slides, cfg.seed)
    records = make_cohort(cfg.data, cfg.n_slides, cfg.seed, cfg.size_scale, cfg.workers, cfg.cache)
    save_config(cfg, cfg.data)
    print(describe_cohort(records))
    print(f"cohort ready in {time.perf_counter() - start:.0f} s: {cfg.data.resolve()}")
    print(f"  slides: {cfg.data / 'slides'}   labels: {cfg.data / 'labels.csv'}   "
          f"ground truth: {cfg.data / 'ground_truth'}")  # fmt: skip
    if cfg.make_data:
        return

    stage = time.perf_counter()
    prep = PreprocessConfig(slides=str(cfg.data / "slides"), out=cfg.runs / "preprocess",
                            workers=cfg.workers)  # fmt: skip
    rows = preprocess(prep)
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        raise PipelineError(f"preprocess failed on {len(failed)} demo slides, first: "
                            f"{failed[0]['error']}")  # fmt: skip
    tiles = sum(int(r["n_tiles"]) for r in rows)
    print(f"preprocess: {tiles} tiles of {prep.tile_size} px at {prep.target_mpp} mpp from "
          f"{len(rows)} slides in {time.perf_counter() - stage:.0f} s -> {prep.out}")  # fmt: skip
    print(f"  QC thumbnails: {prep.out / 'thumbnails'}   coords: {prep.out / 'coords'}")
