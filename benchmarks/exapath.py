"""EXAPath's stain-normalised pretraining against pretraining on raw tiles, on a demo cohort
whose sites and slides each have their own stain colours.

EXAPath (Yun et al., 2024) pretrains on Macenko-normalised tiles to reduce WSI-specific
feature collapse. Here, per seed: the tiny CPU recipe (``configs/pretrain/tiny-cpu.yaml``)
for ``--steps`` steps on the tiles of one preprocess run, once on raw tiles and once with
``--data.stain_norm exapath`` (same seed, same tile stream). Each exported encoder then
embeds labelled tiles of the development slides (``--classes tissue``: the tissue class of
each tile's texture, skin, stroma, ...; ``tumour``: tumour / normal), with the normalizer
its folder records (as ``cpath extract`` applies it by default: none for the raw arm).
Figures:

- ``slide_knn``: leave-one-out slide-ID kNN accuracy (k = 10, cosine,
  :func:`pipeline.ssl.probe.slide_knn_accuracy`); lower: less clustering by slide;
- ``robustness``: the PathoROB robustness index with the scanning site as confounder, each
  tile's own slide left out of its neighbours (:func:`pipeline.eval.robustness.
  robustness_index`); higher: neighbours follow biology rather than the site;
- ``task_knn``: balanced accuracy of a kNN probe of the labels, folds grouped by slide.

Printed: a markdown table per arm (mean and standard deviation over seeds), the seeds on
which the normalised arm wins each figure, seconds per pretraining run and peak memory.

Usage: ``python benchmarks/exapath.py [--seeds 3] [--steps 150] [--classes tissue] [--work DIR]``
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.data.demo import make_cohort, tile_labels
from pipeline.data.tiles import TileDataset
from pipeline.encoders import load_encoder
from pipeline.eval.robustness import robustness_index
from pipeline.extraction import choose_stain_norm
from pipeline.ssl.pretrain import PretrainConfig
from pipeline.ssl.probe import knn_probe, load_tile_images, slide_knn_accuracy
from pipeline.stain import load_normalizer
from pipeline.wsi.preprocess import PreprocessConfig
from pipeline.wsi.preprocess import run as preprocess

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pretrain" / "tiny-cpu.yaml"
ARMS = ("raw", "exapath")
FIGURES = ("slide_knn", "robustness", "task_knn")


def prepare(work: Path, classes: str = "tissue") -> tuple[Path, list[dict]]:
    """The cohort (8 development slides of 4 sites, half size), its coords and labelled tiles."""
    cohort = work / "cohort"
    make_cohort(cohort, n_slides=8, size_scale=0.5, progress=False)
    prep = work / "prep"
    if not (prep / "coords").is_dir():
        assert (
            preprocess(PreprocessConfig(slides=str(cohort / "slides"), out=prep, tile_size=128))
            == 0
        )
    rows = tile_labels(prep / "coords", cohort, per_slide=40, classes=classes)
    return prep / "coords", rows


def pretrain(coords: Path, out: Path, seed: int, steps: int, stain: str | None) -> float:
    """Seconds of one tiny pretraining run (skipped when its encoder exists)."""
    from pipeline.ssl.train import train

    if (out / "encoder" / "config.json").is_file():
        return float("nan")
    cfg = load_config(PretrainConfig, TINY)
    cfg = replace(
        cfg,
        out=out,
        data=replace(cfg.data, coords=coords, seed=seed, stain_norm=stain, workers=1),
        trainer=replace(cfg.trainer, max_steps=steps, progress_bar=False, ckpt_every_n_steps=steps),
        monitor=replace(cfg.monitor, slide_knn_every_n_steps=0),
    )
    t0 = time.perf_counter()
    train(cfg)
    return time.perf_counter() - t0


def score(encoder_dir: Path, rows: list[dict], coords: Path) -> dict[str, float]:
    """The three figures of one encoder on the labelled tiles."""
    files = sorted({r["coords"] for r in rows})
    tiles = TileDataset([coords / Path(f).name if not Path(f).is_absolute() else f for f in files])
    slot = {f: i for i, f in enumerate(files)}
    items = [int(tiles.offsets[slot[r["coords"]]]) + int(r["index"]) for r in rows]
    encoder = load_encoder(encoder_dir)
    images = load_tile_images(tiles, items, encoder.input_size)  # N x 3 x S x S uint8
    body, _, _ = choose_stain_norm(None, encoder)  # as `cpath extract` by default
    if body is not None:
        images = load_normalizer(body)(images)
    with torch.inference_mode():
        feats = torch.cat([encoder.embed(b) for b in images.split(256)]).float().numpy()
    labels = np.array([r["label"] for r in rows])
    slides = np.array([r["slide_id"] for r in rows])
    sites = np.array([r["site"] for r in rows])
    index = robustness_index(feats, labels, sites, exclude=slides)
    return {
        "slide_knn": slide_knn_accuracy(feats, slides, k=10),
        "robustness": float("nan") if index is None else index["value"],
        "task_knn": knn_probe(feats, labels, slides),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--work", type=Path, default=None, help="kept between runs when given")
    parser.add_argument(
        "--classes", choices=("tumour", "tissue"), default="tissue", help="labels of the tiles"
    )
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    work = args.work or Path(tempfile.mkdtemp(prefix="exapath-"))
    coords, rows = prepare(work, args.classes)
    print(
        f"{len(rows)} labelled tiles of {len({r['slide_id'] for r in rows})} slides, "
        f"{len({r['site'] for r in rows})} sites; {args.steps} steps per run"
    )
    results = {arm: {f: [] for f in FIGURES} for arm in ARMS}
    seconds = {arm: [] for arm in ARMS}
    for seed in range(args.seeds):
        for arm in ARMS:
            out = work / f"{arm}-seed{seed}-steps{args.steps}"
            stain = "exapath" if arm == "exapath" else None
            seconds[arm].append(pretrain(coords, out, seed, args.steps, stain))
            for name, value in score(out / "encoder", rows, coords).items():
                results[arm][name].append(value)
        print(
            f"seed {seed}: "
            + "; ".join(
                f"{arm} " + ", ".join(f"{f} {results[arm][f][-1]:.3f}" for f in FIGURES)
                for arm in ARMS
            ),
            flush=True,
        )
    print(
        "\n| arm | slide-ID kNN acc (lower better) | PathoROB index (higher) | task kNN bacc | s / run |"
    )
    print("| --- | --- | --- | --- | --- |")
    for arm in ARMS:
        cells = [
            f"{statistics.mean(results[arm][f]):.3f} +- {statistics.pstdev(results[arm][f]):.3f}"
            for f in FIGURES
        ]
        runs = [s for s in seconds[arm] if s == s]
        timing = f"{statistics.median(runs):.0f}" if runs else "cached"
        print(f"| {arm} | {' | '.join(cells)} | {timing} |")
    wins = {
        "slide_knn": sum(
            e < r
            for e, r in zip(
                results["exapath"]["slide_knn"], results["raw"]["slide_knn"], strict=True
            )
        ),
        "robustness": sum(
            e > r
            for e, r in zip(
                results["exapath"]["robustness"], results["raw"]["robustness"], strict=True
            )
        ),
    }
    print(
        f"\nexapath lowers slide-ID kNN on {wins['slide_knn']}/{args.seeds} seeds and raises "
        f"the robustness index on {wins['robustness']}/{args.seeds}; peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
