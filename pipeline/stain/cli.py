"""``cpath stain``: fit a stain normalizer to a target, apply it, report slide clustering.

cpath stain --action fit --method macenko --target TILE.png --out stain.json
cpath stain --action apply --stain stain.json --input IN.png --out OUT.png
cpath stain --action apply --stain stain.json --input SLIDE.svs --region x,y,w,h --out OUT.png
cpath stain --action report --stain stain.json --input runs/prep/coords --out report.json
cpath stain --action report --stain stain.json --input runs/prep/coords --encoder runs/pretrain/encoder

The report measures how strongly tiles cluster by slide before and after normalization
(:mod:`pipeline.stain.report`), on the tiles' colour statistics or, with ``--encoder``, on
that encoder's features; the report and its log say which were measured.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from PIL import Image

from pipeline.errors import ConfigError, PipelineError
from pipeline.io import atomic_path, atomic_write_text
from pipeline.stain.base import STAIN_METHODS, load_normalizer, make_normalizer

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
log = logging.getLogger(__name__)


@dataclass
class StainConfig:
    """Fit, apply and assess stain normalization (Macenko, Reinhard, Vahadane).

    Args:
        action: fit (target -> stain.json), apply (stain.json + image or slide region -> PNG), or report.
        method: normalizer to fit (macenko, reinhard, vahadane).
        target: image(s) to fit to: a PNG/JPEG/TIFF file or a folder of them.
        stain: fitted normalizer (JSON) for apply and report.
        input: apply: an image or a slide; report: a folder of coords files.
        region: apply on a slide: "x,y,w,h" in level-0 px (read at level 0).
        out: output file: stain.json (fit), PNG (apply), report JSON (report).
        tiles_per_slide: report: tiles sampled per slide.
        encoder: report: measure this encoder's features instead of colour statistics (an
            exported folder, timm:<arch> or hf-hub:<org>/<name>, as `cpath extract --encoder`).
        encoder_weights: report: local weights for a timm:<arch> encoder or, of the same
            architecture, for an exported folder (as `cpath extract --encoder_weights`).
        device: cpu or cuda.
    """

    positional: ClassVar[tuple[str, ...]] = ("action",)

    action: Literal["fit", "apply", "report"] = "fit"
    method: str = "macenko"
    target: Path | None = None
    stain: Path | None = None
    input: Path | None = None
    region: str | None = None
    out: Path | None = None
    tiles_per_slide: int = 32
    encoder: str | None = None
    encoder_weights: Path | None = None
    device: str = "cpu"


def _read_image(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as img:
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)  # 3 x H x W
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: cannot read the image ({exc})") from exc


def _require(value: Path | None, flag: str, action: str) -> Path:
    if value is None:
        raise ConfigError(f"`cpath stain --action {action}` needs {flag}")
    return Path(value)


def fit(cfg: StainConfig) -> Path:
    target = _require(cfg.target, "--target IMAGE (or a folder of images)", "fit")
    out = _require(cfg.out, "--out stain.json", "fit")
    if cfg.method not in STAIN_METHODS:
        raise ConfigError(
            f"unknown --method '{cfg.method}'; known: {', '.join(sorted(STAIN_METHODS))}"
        )
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        files = [target]
    if not files:
        raise PipelineError(f"{target}: no images to fit to")
    normalizer = make_normalizer(cfg.method)
    try:
        normalizer.fit([_read_image(p) for p in files])
    except ValueError as exc:
        raise PipelineError(
            f"{target}: cannot fit {cfg.method}: {exc}; choose a tile with tissue"
        ) from exc
    return normalizer.save(out)


def apply(cfg: StainConfig) -> Path:
    stain = _require(cfg.stain, "--stain stain.json", "apply")
    source = _require(cfg.input, "--input IMAGE or SLIDE", "apply")
    out = _require(cfg.out, "--out OUT.png", "apply")
    normalizer = load_normalizer(stain, cfg.device)
    if cfg.region:
        from pipeline.wsi.reader import Slide

        try:
            x, y, w, h = (int(v) for v in cfg.region.split(","))
        except ValueError:
            raise ConfigError(f"--region '{cfg.region}' is not x,y,w,h") from None
        with Slide(source) as slide:
            image = torch.from_numpy(slide.read_region((x, y), 0, (w, h))).permute(2, 0, 1)
    else:
        image = _read_image(source)
    result = normalizer(image.to(cfg.device)).permute(1, 2, 0).cpu().numpy()
    with atomic_path(out) as tmp:
        Image.fromarray(result).save(tmp, format="PNG")
    if normalizer.passthrough:
        print(f"{source}: too little tissue to estimate its stains; written unchanged")
    return out


def sample_tiles(coords: Path, per_slide: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """``(N x 3 x H x W uint8 tiles, N slide indices)``: up to ``per_slide`` tiles of every
    coords file in ``coords`` (a seeded sample), the tiles the report measures."""
    from pipeline.data.tiles import TileDataset

    files = sorted(coords.glob("*.h5"))
    if len(files) < 2:
        raise PipelineError(f"{coords}: need coords files of at least two slides")
    dataset = TileDataset(files)
    rng = np.random.default_rng(seed)
    picks, slides = [], []
    for s in range(len(files)):
        start, stop = int(dataset.offsets[s]), int(dataset.offsets[s + 1])
        rows = rng.choice(np.arange(start, stop), min(per_slide, stop - start), replace=False)
        picks += rows.tolist()
        slides += [s] * len(rows)
    tiles = torch.stack([dataset[i]["image"] for i in picks])
    dataset.close()
    return tiles, np.array(slides)


def report(cfg: StainConfig) -> dict:
    """Slide clustering (:func:`pipeline.stain.report.slide_clustering`) of sampled tiles
    before and after normalization, measured on their colour statistics or, with
    ``cfg.encoder``, on that encoder's features (``"features"`` in the result says which)."""
    from pipeline.stain import report as measures

    coords = _require(cfg.input, "--input COORDS_DIR (from cpath preprocess)", "report")
    normalizer = load_normalizer(_require(cfg.stain, "--stain stain.json", "report"), cfg.device)
    if cfg.encoder:
        from pipeline.encoders import load_encoder

        with torch.random.fork_rng(devices=[]):  # random-init encoders (timm:<arch>) repeat
            torch.manual_seed(0)
            encoder = load_encoder(cfg.encoder, weights=cfg.encoder_weights, device=cfg.device)
        measured = f"features of encoder {encoder.name}"

        def describe(images: torch.Tensor) -> np.ndarray:
            return measures.encoder_features(encoder, images)
    else:
        measured, describe = measures.COLOUR_STATISTICS, measures.colour_features
    tiles, slides = sample_tiles(coords, cfg.tiles_per_slide)
    tiles = tiles.to(cfg.device)
    normalized = torch.cat([normalizer(tiles[i : i + 256]) for i in range(0, len(tiles), 256)])
    log.info(
        "stain report: slide clustering of %d tiles of %d slides, measured on %s",
        len(tiles),
        len(np.unique(slides)),
        measured,
    )
    before, after = describe(tiles), describe(normalized)  # N x D each
    result = {
        "features": measured,
        "feature_dim": int(before.shape[1]),
        "before": measures.slide_clustering(before, slides),
        "after": measures.slide_clustering(after, slides),
        "passthrough": normalizer.passthrough,
        "method": normalizer.method,
    }
    if cfg.out:
        atomic_write_text(cfg.out, json.dumps(result, indent=1))
    return result


def run(cfg: StainConfig) -> None:
    if cfg.action == "fit":
        path = fit(cfg)
        print(f"fitted {cfg.method} -> {path}")
    elif cfg.action == "apply":
        print(f"normalized -> {apply(cfg)}")
    else:
        r = report(cfg)
        print(f"slide clustering measured on {r['features']} ({r['feature_dim']} per tile)")
        for when in ("before", "after"):
            m = r[when]
            print(
                f"{when:>6} normalization: slide-ID probe accuracy {m['slide_probe_accuracy']:.3f} "
                f"(chance {m['chance']:.3f}), silhouette by slide {m['silhouette']:.3f}"
            )
