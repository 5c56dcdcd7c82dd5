"""EXAPath's stain-normalised pretraining against pretraining on raw tiles, on cohorts
whose sites and slides each have their own stain colours.

EXAPath (Yun et al., 2024) pretrains on Macenko-normalised tiles to reduce WSI-specific
feature collapse. Two designs (``--design``), each run per seed once on raw tiles and once
on tiles normalised with EXAPath's constants (same seed, same tile stream):

- ``planted`` (default): synthetic tiles of 4 textures (the curation benchmark's patterns)
  rendered by the Beer-Lambert law from haematoxylin and eosin concentrations that do not
  depend on the texture, with stain vectors and strengths of their slide: 4 sites, each
  with its own stain vectors, 5 slides per site jittered around them, every texture in
  every slide. Biology is the texture only, colour is the site and slide only: the design
  PathoROB asks for. A tiny DINOv2 run in process (``--steps`` steps on 2000 tiles);
  scored on 800 fresh tiles of the same slides.
- ``demo``: the tiny CPU recipe (``configs/pretrain/tiny-cpu.yaml``) through ``cpath
  pretrain`` on the tiles of one preprocess run of the demo cohort, raw or with
  ``--data.stain_norm exapath``. Each exported encoder embeds labelled tiles of the
  development slides (``--classes tissue``: the tissue class of each tile's texture, skin,
  stroma, ...; ``tumour``: tumour / normal), with the normalizer its folder records (as
  ``cpath extract`` applies it by default: none for the raw arm). In this cohort each
  tissue class comes from its own source images, whose stain hue differs: colour is
  partly biology here, and normalisation removes it.

Figures:

- ``slide_knn``: leave-one-out slide-ID kNN accuracy (k = 10, cosine,
  :func:`pipeline.ssl.probe.slide_knn_accuracy`); lower: less clustering by slide;
- ``robustness``: the PathoROB robustness index with the scanning site as confounder, each
  tile's own slide left out of its neighbours (:func:`pipeline.eval.robustness.
  robustness_index`); higher: neighbours follow biology rather than the site;
- ``task_knn``: balanced accuracy of a kNN probe of the labels, folds grouped by slide.

Printed: a markdown table per arm (mean and standard deviation over seeds), the seeds on
which the normalised arm wins each figure, seconds per pretraining run and peak memory.

Usage: ``python benchmarks/exapath.py [--design planted|demo] [--seeds 3] [--steps 300]
[--slides 24] [--classes tissue] [--work DIR]``
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import sys
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
sys.path.insert(0, str(ROOT))  # the planted design reuses benchmarks.curation
TINY = ROOT / "configs" / "pretrain" / "tiny-cpu.yaml"
ARMS = ("raw", "exapath")
FIGURES = ("slide_knn", "robustness", "task_knn")


# Beer-Lambert rendering of the planted design: optical density = c_H * v_H + c_E * v_E
STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])  # H, E unit-ish RGB OD vectors
SITES, SLIDES_PER_SITE, TEXTURES = 4, 5, 4
SITE_VECTOR_SD, SITE_STRENGTH = 0.08, (0.6, 1.4)  # per-site stain vectors and strengths
SLIDE_VECTOR_SD, SLIDE_STRENGTH = 0.05, (0.9, 1.1)  # per-slide jitter around its site
IO = 240.0  # light through glass


def slide_stains(rng: np.random.Generator) -> np.ndarray:
    """``SITES * SLIDES_PER_SITE x 2 x 3`` stain OD vectors (strength included) per slide,
    slides of a site consecutive."""
    out = []
    for _ in range(SITES):
        while True:  # a stain protocol H&E could be: haematoxylin absorbs more red, the
            # two vectors at least 40 degrees apart
            site = np.abs(STAINS + rng.normal(0, SITE_VECTOR_SD, STAINS.shape))
            site = site / np.linalg.norm(site, axis=1, keepdims=True)
            if site[0, 0] > site[1, 0] + 0.2 and site[0] @ site[1] < np.cos(np.radians(40)):
                break
        site = site * rng.uniform(*SITE_STRENGTH, (2, 1))
        for _ in range(SLIDES_PER_SITE):
            slide = np.abs(site + rng.normal(0, SLIDE_VECTOR_SD, site.shape))
            out.append(slide * rng.uniform(*SLIDE_STRENGTH, (2, 1)))
    return np.stack(out)


def render(kind: int, stains: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One ``3 x SIDE x SIDE`` uint8 tile of texture ``kind`` in a slide's ``stains``:
    haematoxylin-rich foreground, eosin-rich background, the same concentrations for every
    texture."""
    from benchmarks.curation import pattern

    fg = pattern(kind, rng)  # SIDE x SIDE
    # every pixel also takes some of both stains, independently: the optical densities
    # fill the plane of the two stain vectors, as in real tissue and as Macenko expects
    h = np.where(fg, rng.uniform(0.7, 1.1), 0.15) + rng.uniform(0, 0.3, fg.shape)
    e = np.where(fg, 0.0, rng.uniform(0.5, 0.8)) + rng.uniform(0, 0.3, fg.shape)
    conc = np.stack([h, e])  # 2 x S x S
    od = np.einsum("cyx,cr->ryx", conc, stains)  # 3 x S x S
    return np.clip(IO * np.exp(-od), 0, 255).astype(np.uint8)


def planted_cohort(
    rng: np.random.Generator, stains: np.ndarray, per_texture: int
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """``per_texture`` tiles of every texture in every slide (slide by slide, shuffled
    within a slide) and their ``label`` / ``slide`` / ``site`` per tile."""
    tiles, meta = [], {"label": [], "slide": [], "site": []}
    for s, stain in enumerate(stains):
        kinds = rng.permutation(np.repeat(np.arange(TEXTURES), per_texture))
        tiles += [render(int(k), stain, rng) for k in kinds]
        meta["label"] += kinds.tolist()
        meta["slide"] += [s] * len(kinds)
        meta["site"] += [s // SLIDES_PER_SITE] * len(kinds)
    return torch.from_numpy(np.stack(tiles)), {k: np.array(v) for k, v in meta.items()}


def figures(feats: np.ndarray, meta: dict[str, np.ndarray]) -> dict[str, float]:
    """The three figures of ``N x D`` features of tiles with ``label``, ``slide``, ``site``."""
    index = robustness_index(feats, meta["label"], meta["site"], exclude=meta["slide"])
    return {
        "slide_knn": slide_knn_accuracy(feats, meta["slide"], k=10),
        "robustness": float("nan") if index is None else index["value"],
        "task_knn": knn_probe(feats, meta["label"], meta["slide"]),
    }


def run_planted(seed: int, steps: int, work: Path) -> dict[str, dict[str, float]]:
    """Both arms of the planted design for one seed: figures per arm, and seconds."""
    from benchmarks.curation import features
    from benchmarks.curation import pretrain as pretrain_tensors

    rng = np.random.default_rng(seed)
    stains = slide_stains(rng)
    n_slides = SITES * SLIDES_PER_SITE
    train, _ = planted_cohort(rng, stains, 2000 // n_slides // TEXTURES)  # 2000 x 3 x S x S
    test, meta = planted_cohort(rng, stains, 10)  # 800 x 3 x S x S
    normalizer = load_normalizer("exapath")
    out = {}
    for arm in ARMS:
        start = time.perf_counter()
        x, y = (train, test) if arm == "raw" else (normalizer(train), normalizer(test))
        module = pretrain_tensors(x, None, seed, steps, work)
        out[arm] = {**figures(features(module, y), meta), "seconds": time.perf_counter() - start}
    return out


def prepare(work: Path, classes: str = "tissue", slides: int = 24) -> tuple[Path, list[dict]]:
    """The cohort (``slides`` development slides of 4 sites, half size), its coords and
    labelled tiles."""
    cohort = work / "cohort"
    make_cohort(cohort, n_slides=slides, size_scale=0.5, progress=False)
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
    meta = {"label": "label", "slide": "slide_id", "site": "site"}
    return figures(feats, {k: np.array([r[c] for r in rows]) for k, c in meta.items()})


def run_demo(args: argparse.Namespace, work: Path):
    """Per seed, the figures of both arms on the demo cohort (a generator of dicts)."""
    coords, rows = prepare(work, args.classes, args.slides)
    spread = {
        y: len({r["site"] for r in rows if r["label"] == y}) for y in {r["label"] for r in rows}
    }
    print(
        f"{len(rows)} labelled tiles of {len({r['slide_id'] for r in rows})} slides, "
        f"{len({r['site'] for r in rows})} sites; {sum(n >= 2 for n in spread.values())} of "
        f"{len(spread)} classes at two sites or more; {args.steps} steps per run"
    )
    for seed in range(args.seeds):
        result = {}
        for arm in ARMS:
            out = work / f"{arm}-seed{seed}-steps{args.steps}"
            stain = "exapath" if arm == "exapath" else None
            seconds = pretrain(coords, out, seed, args.steps, stain)
            result[arm] = {**score(out / "encoder", rows, coords), "seconds": seconds}
        yield result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--design", choices=("planted", "demo"), default="planted")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="default: planted 300, demo 150")
    parser.add_argument(
        "--slides",
        type=int,
        default=24,
        help="demo: development slides (24: every tissue class at two sites or more)",
    )
    parser.add_argument("--work", type=Path, default=None, help="kept between runs when given")
    parser.add_argument(
        "--classes", choices=("tumour", "tissue"), default="tissue", help="demo: tile labels"
    )
    args = parser.parse_args()
    args.steps = args.steps or (300 if args.design == "planted" else 150)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    work = args.work or Path(tempfile.mkdtemp(prefix="exapath-"))
    if args.design == "planted":
        torch.set_num_threads(1)  # ops this small run slower on threads that share cores
        print(
            f"planted: {TEXTURES} textures x {SITES} sites x {SLIDES_PER_SITE} slides; "
            f"2000 pretraining tiles of 40 px, 800 scored; {args.steps} steps per run"
        )
        per_seed = (run_planted(seed, args.steps, work) for seed in range(args.seeds))
    else:
        per_seed = run_demo(args, work)
    results = {arm: {f: [] for f in FIGURES} for arm in ARMS}
    seconds = {arm: [] for arm in ARMS}
    for seed, result in enumerate(per_seed):
        for arm in ARMS:
            seconds[arm].append(result[arm]["seconds"])
            for f in FIGURES:
                results[arm][f].append(result[arm][f])
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
    pairs = {f: list(zip(results["exapath"][f], results["raw"][f], strict=True)) for f in FIGURES}
    lower = sum(e < r for e, r in pairs["slide_knn"])
    higher = sum(e > r for e, r in pairs["robustness"])
    print(
        f"\nexapath lowers slide-ID kNN on {lower}/{args.seeds} seeds and raises "
        f"the robustness index on {higher}/{args.seeds}; peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
