"""``cpath preprocess``: tissue detection and tiling at a physical resolution.

For every slide: open it and resolve its level-0 mpp, read its pyramid level nearest
16 um per px (never the full slide), detect tissue, lay the tile grid at the target mpp and
keep tiles with enough tissue. Outputs under ``out``::

    coords/<slide_id>.h5          tiles (see :mod:`pipeline.wsi.coords`)
    tissue/<slide_id>.geojson     tissue polygons in level-0 px (QuPath opens it)
    thumbnails/<slide_id>.jpg     QC: tissue outline and tile grid over the thumbnail
    manifest.csv                  slide_id, path, status, n_tiles, level0_mpp, ...
    config.yaml                   the resolved config

:func:`tile_slide` does a slide's work in memory (no file written), for use from Python;
:func:`process_slide` adds the files. Every file is written under a temporary name and
renamed. A rerun skips slides whose
coords file was made with the same parameters and redoes failed ones; a slide that
fails (corrupt, truncated, not a slide, no tissue, no mpp) becomes a ``failed`` row
and never stops the others.
"""

from __future__ import annotations

import glob
import json
import logging
import multiprocessing
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

import pipeline
from pipeline.config import save_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.io import (
    atomic_path,
    atomic_write_text,
    sha256_file,
    shard_suffix,
    write_manifest,
)
from pipeline.wsi.contours import mask_polygons, polygons_to_geojson
from pipeline.wsi.coords import read_coords, write_coords
from pipeline.wsi.masks import (
    GEOJSON_SUFFIXES,
    IMAGE_SUFFIXES,
    annotation_labels,
    cap_per_label,
    find_mask_file,
    user_tissue_mask,
)
from pipeline.wsi.quality import QUALITY_COUNTS, QualityConfig, any_active, quality_keep
from pipeline.wsi.reader import MPP_RANGE, Slide
from pipeline.wsi.slides import SlideEntry, list_slides, parse_shard, shard_slides
from pipeline.wsi.tiling import Grid, tile_grid
from pipeline.wsi.tissue import TISSUE_METHODS, TissueConfig, make_tissue_detector, to_hsv8

log = logging.getLogger(__name__)
MANIFEST_FIELDS = [
    "slide_id",
    "path",
    "status",
    "n_tiles",
    "level0_mpp",
    "mpp_source",
    *QUALITY_COUNTS,
    "seconds",
    "error",
]


@dataclass
class PreprocessConfig:
    """Detect tissue and tile every slide at a target resolution (mpp).

    Args:
        slides: a folder (searched recursively; a folder of DICOM files is one slide), a glob, a CSV (columns path[, slide_id, mpp]) or one slide.
        out: output folder (coords/, tissue/, thumbnails/, manifest.csv).
        mpp: target resolution of the tiles in um per px (0.5 ~ 20x, 0.25 ~ 40x).
        magnification: alternative to mpp: objective power of the tiles (20 -> 0.5 mpp).
        tile_size: tile side in px at the target resolution.
        overlap: overlap of neighbouring tiles in px at the target resolution.
        min_tissue: keep tiles whose tissue share is at least this (0-1).
        level0_mpp: level-0 resolution (um per px) of every slide, overriding its metadata (a slide list's mpp column sets it per slide); a value more than 5% from the metadata's is logged as a warning.
        workers: slides processed in parallel (processes).
        shard: "i/n" to process every n-th slide from the i-th (else SLURM array task x torchrun or srun rank).
        thumbnails: write QC thumbnails.
        thumbnail_size: longest side of QC thumbnails, px.
        tissue: tissue detection settings.
        quality: tile quality filters (white, black, grey, blur; all off by default), counted per slide in the manifest.
        tissue_mask: a folder of tissue masks given per slide, used instead of detection: <slide_id>.geojson (polygons in level-0 px, e.g. a QuPath export) or <slide_id>.png/.tif (an image spanning the slide, non-zero = tissue); a slide without one fails.
        annotations: a folder of <slide_id>.geojson annotations whose class (QuPath classification) labels the tiles they cover; the label of each tile is written into its coords file; a slide without one fails.
        annotation_min_share: a tile takes the class covering most of it when that class covers at least this share (else no label).
        annotated_only: keep only the tiles with a label.
        label_caps: at most this many tiles per label (a seeded sample), e.g. {"Tumor": 2000}; labels not named keep all.
        seed: seed of the per-label sampling.
    """

    slides: str = ""
    out: Path = Path("runs/preprocess")
    mpp: float | None = 0.5
    magnification: float | None = None
    tile_size: int = 256
    overlap: int = 0
    min_tissue: float = 0.5
    level0_mpp: float | None = None
    workers: int = 1
    shard: str | None = None
    thumbnails: bool = True
    thumbnail_size: int = 1024
    tissue: TissueConfig = field(default_factory=TissueConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    tissue_mask: str | None = None
    annotations: str | None = None
    annotation_min_share: float = 0.5
    annotated_only: bool = False
    label_caps: dict[str, int] = field(default_factory=dict)
    seed: int = 0

    @property
    def target_mpp(self) -> float:
        return 10.0 / self.magnification if self.magnification else float(self.mpp or 0.0)

    def validate(self) -> None:
        if self.target_mpp <= 0:
            raise ConfigError(
                "give a target resolution: --mpp (e.g. 0.5) or --magnification (e.g. 20)"
            )
        if self.tile_size < 8:
            raise ConfigError(f"--tile-size {self.tile_size} is too small (at least 8 px)")
        if not 0 <= self.overlap < self.tile_size:
            raise ConfigError(f"--overlap must be in [0, tile_size), got {self.overlap}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"--min-tissue must be in [0, 1], got {self.min_tissue}")
        if self.level0_mpp is not None and not MPP_RANGE[0] <= self.level0_mpp <= MPP_RANGE[1]:
            raise ConfigError(
                f"--level0-mpp {self.level0_mpp} is not a level-0 resolution in um per px "
                f"({MPP_RANGE[0]}-{MPP_RANGE[1]}; 0.25 is typical of 40x, 0.5 of 20x)"
            )
        for name in ("tissue_mask", "annotations"):
            folder = getattr(self, name)
            if folder and not Path(folder).is_dir():
                raise ConfigError(f"--{name} {folder}: no such folder (one file per slide)")
        if not 0.0 < self.annotation_min_share <= 1.0:
            raise ConfigError(
                f"--annotation_min_share must be in (0, 1], got {self.annotation_min_share}"
            )
        if self.label_caps and not self.annotations:
            raise ConfigError("--label_caps needs --annotations")
        if any(int(v) < 0 for v in self.label_caps.values()):
            raise ConfigError(f"--label_caps must be counts >= 0, got {self.label_caps}")
        if errors := self.quality.validate():
            raise ConfigError("; ".join(errors))
        if self.tissue.method not in TISSUE_METHODS:
            raise ConfigError(
                f"unknown --tissue.method '{self.tissue.method}'; "
                f"known: {', '.join(sorted(TISSUE_METHODS))}"
            )

    def tiling_params(self) -> dict:
        """The parameters a coords file must match to be reused by a rerun."""
        return {
            "target_mpp": self.target_mpp,
            "patch_size": self.tile_size,
            "overlap": self.overlap,
            "min_tissue": self.min_tissue,
            "tissue_method": self.tissue.method,
            "tissue_params": json.dumps(asdict(self.tissue), sort_keys=True),
            "quality_params": json.dumps(asdict(self.quality), sort_keys=True),
            "tissue_mask": str(Path(self.tissue_mask).resolve()) if self.tissue_mask else "",
            "annotation_params": json.dumps(
                {
                    "folder": str(Path(self.annotations).resolve()) if self.annotations else "",
                    "min_share": self.annotation_min_share,
                    "annotated_only": self.annotated_only,
                    "label_caps": self.label_caps,
                    "seed": self.seed,
                },
                sort_keys=True,
            ),
            "tissue_rules": TISSUE_RULES,
        }


# The version of the tissue and ink rules: coords files made by other rules are redone.
TISSUE_RULES = 3


def _same(stored: object, wanted: object) -> bool:
    if isinstance(wanted, float):
        return isinstance(stored, (int, float)) and bool(np.isclose(stored, wanted))
    return stored == wanted


def _given_files(cfg: PreprocessConfig, slide_id: str) -> dict[str, Path | None]:
    """The tissue mask and annotation files given for ``slide_id`` (None: none found)."""
    files: dict[str, Path | None] = {}
    if cfg.tissue_mask:
        files["tissue_mask"] = find_mask_file(
            cfg.tissue_mask, slide_id, (*GEOJSON_SUFFIXES, *IMAGE_SUFFIXES)
        )
    if cfg.annotations:
        files["annotations"] = find_mask_file(cfg.annotations, slide_id, GEOJSON_SUFFIXES)
    return files


def _is_done(coords_path: Path, params: dict, entry: SlideEntry) -> dict | None:
    """Attributes of an existing coords file made from ``entry``'s slide with ``params``
    and the level-0 mpp the slide resolves to now, else None.

    A given mpp (``entry.level0_mpp``) overrides the metadata: a file made from the
    metadata is redone when a value is given now, and a file made from a given value is
    redone when that value changed or is no longer given.

    Files it cannot judge (unreadable, another tool's or an older schema, a key
    missing) are not done: the slide is processed again.
    """
    if not coords_path.exists():
        return None
    try:
        attrs = read_coords(coords_path).attrs
        if any(k not in attrs or not _same(attrs[k], v) for k, v in params.items()):
            return None
        if attrs.get("slide_path") != str(Path(entry.path).resolve()):
            return None
        # The metadata resolves as before (same file); only a user-given mpp can change.
        if attrs.get("mpp_source") == "override":
            if entry.level0_mpp is None or not _same(attrs.get("level0_mpp"), entry.level0_mpp):
                return None
        elif entry.level0_mpp is not None:
            return None
        return attrs
    except Exception as exc:  # noqa: BLE001 - any doubt means redo the slide
        log.debug("%s: not reused (%s)", coords_path, exc)
        return None


def _remove_stale_temporaries(out: Path, slide_id: str) -> None:
    """Delete this slide's temporary files (``.<id>.<ext>.<pid>.tmp``) left by a killed run.

    Names are matched exactly: ``S1`` never touches ``S1.rescan``'s files, which another
    shard may be writing.
    """
    for folder, ext in (("coords", ".h5"), ("tissue", ".geojson"), ("thumbnails", ".jpg")):
        name = f".{slide_id}{ext}."
        for tmp in (out / folder).glob(f"{glob.escape(name)}*.tmp"):
            if tmp.name[len(name) : -len(".tmp")].isdigit():  # the writer's pid
                tmp.unlink(missing_ok=True)


def draw_qc(
    thumbnail: np.ndarray,
    polygons: list,
    coords: np.ndarray,
    size0: int,
    scale: float,
    max_size: int,
) -> np.ndarray:
    """Thumbnail (RGB) with tissue outlines (green) and kept tiles (blue boxes).

    ``scale`` is thumbnail px per level-0 px; polygons are in thumbnail px.
    """
    shrink = min(1.0, max_size / max(thumbnail.shape[:2]))
    image = np.ascontiguousarray(thumbnail)
    if shrink < 1.0:  # bilinear down to half size (a QC image), area averaging beyond
        size = (max(1, round(image.shape[1] * shrink)), max(1, round(image.shape[0] * shrink)))
        smooth = cv2.INTER_LINEAR if shrink >= 0.5 else cv2.INTER_AREA
        image = cv2.resize(image, size, interpolation=smooth)
    else:
        image = image.copy()
    s = scale * shrink
    side = max(1, round(size0 * s))
    h, w = image.shape[:2]
    x0, y0 = np.round(coords * s).astype(np.int64).T  # N, N: every box's top-left
    run = np.arange(side + 1)  # the px along one side of a box
    for a, b in ((y0, x0), (y0 + side, x0)):  # top and bottom sides: rows a, columns b + run
        cols = (b[:, None] + run).ravel()
        rows = np.repeat(a, side + 1)
        ok = (rows < h) & (cols < w)
        image[rows[ok], cols[ok]] = (30, 90, 220)
    for a, b in ((x0, y0), (x0 + side, y0)):  # left and right sides
        rows = (b[:, None] + run).ravel()
        cols = np.repeat(a, side + 1)
        ok = (rows < h) & (cols < w)
        image[rows[ok], cols[ok]] = (30, 90, 220)
    rings = [np.round(ring * shrink).astype(np.int32) for rings in polygons for ring in rings]
    cv2.polylines(image, rings, isClosed=True, color=(0, 170, 0), thickness=2)
    return image


def write_jpeg(path: Path, rgb: np.ndarray, quality: int = 90) -> None:
    """An RGB uint8 image as a JPEG file, written atomically."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise PipelineError(f"{path}: JPEG encoding failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())


@dataclass
class SlideTiles:
    """One slide tiled in memory (:func:`tile_slide`): what its output files are made of."""

    grid: Grid  # the kept tiles
    thumbnail: np.ndarray  # H x W x 3 uint8: the image tissue was detected on
    mask: np.ndarray  # H x W bool: tissue on the thumbnail
    labels: np.ndarray | None  # N str: annotation class per tile ("" for none), if annotated
    counts: dict  # tiles dropped by each quality filter
    attrs: dict  # the slide's part of the coords file's attributes


def tile_slide(
    entry: SlideEntry, cfg: PreprocessConfig, given: dict[str, Path | None] | None = None
) -> SlideTiles:
    """Tile one slide in memory: open it, resolve its level-0 mpp, read the level tissue is
    detected on, detect tissue (or take the given mask), lay the grid at the target mpp
    and keep the tiles with enough tissue, then apply the quality filters and the
    annotations. Writes nothing; a bad slide raises :class:`PipelineError` (or
    :class:`SlideError`) saying what to do.

    ``given``: the slide's tissue mask and annotation files (:func:`_given_files`; found
    here when None).
    """
    given = _given_files(cfg, entry.slide_id) if given is None else given
    with Slide(entry.path, level0_mpp=entry.level0_mpp) as slide:
        warning = slide.override_warning()
        if warning:
            log.warning("slide %s: %s", entry.slide_id, warning)
        level0_mpp = slide.mpp
        thumb = slide.detection_thumbnail(cfg.tissue.mpp)
        mask_mpp = level0_mpp * slide.dimensions[0] / thumb.shape[1]
        if cfg.tissue_mask:  # given: the tiles' shares from it, outlines at thumbnail size
            tissue, _ = user_tissue_mask(
                cfg.tissue_mask, entry.slide_id, slide.dimensions, level0_mpp
            )
            size = (thumb.shape[1], thumb.shape[0])
            mask = np.asarray(Image.fromarray(tissue).resize(size, Image.Resampling.NEAREST))
            if not tissue.any():
                raise PipelineError(f"{given['tissue_mask']}: the tissue mask is empty")
        else:
            tissue = mask = make_tissue_detector(cfg.tissue)(thumb, mask_mpp)
        if not mask.any() and not cfg.tissue_mask:
            raise PipelineError(
                f"{entry.path}: no tissue found (tissue method '{cfg.tissue.method}'). "
                "Check the thumbnail; if the stain is faint, lower --tissue.min_saturation."
            )
        grid = tile_grid(
            slide.dimensions,
            level0_mpp,
            cfg.target_mpp,
            cfg.tile_size,
            cfg.overlap,
            tissue,
            cfg.min_tissue,
        )
        if len(grid.coords) == 0:
            raise PipelineError(
                f"{entry.path}: tissue found, but no {cfg.tile_size}-px tile at "
                f"{cfg.target_mpp} mpp has {cfg.min_tissue:.0%} tissue; lower --min-tissue "
                "or --tile-size."
            )
        counts = dict.fromkeys(QUALITY_COUNTS, 0)
        if any_active(cfg.quality):
            side = max(8, round(grid.patch_size_level0 * level0_mpp / cfg.quality.blur_mpp))
            keep, counts = quality_keep(
                cfg.quality,
                thumb,
                to_hsv8(thumb),
                slide.dimensions,
                grid.coords,
                grid.patch_size_level0,
                lambda loc, size0: slide.read_tile(loc, (size0, size0), (side, side)),
            )
            grid = Grid(grid.coords[keep], grid.tissue_fraction[keep], grid.patch_size_level0)
            if len(grid.coords) == 0:
                raise PipelineError(
                    f"{entry.path}: every tile with tissue failed the quality filters "
                    f"({', '.join(f'{k} {v}' for k, v in counts.items() if v)}); loosen "
                    "--quality.*."
                )
        labels = None
        if cfg.annotations:
            if given["annotations"] is None:
                raise PipelineError(
                    f"no annotations for slide {entry.slide_id} in {cfg.annotations} "
                    f"(looked for {entry.slide_id}.geojson, .json); add them, or preprocess "
                    "this slide without --annotations."
                )
            labels = annotation_labels(
                given["annotations"],
                slide.dimensions,
                level0_mpp,
                grid.coords,
                grid.patch_size_level0,
                cfg.annotation_min_share,
            )
            keep = cap_per_label(labels, cfg.label_caps, cfg.seed)
            if cfg.annotated_only:
                keep &= labels != ""
            grid = Grid(grid.coords[keep], grid.tissue_fraction[keep], grid.patch_size_level0)
            labels = labels[keep]
            if len(grid.coords) == 0:
                raise PipelineError(
                    f"{given['annotations']}: no tissue tile is at least "
                    f"{cfg.annotation_min_share:.0%} inside an annotation"
                )
        patch_level = slide.best_level(cfg.target_mpp / level0_mpp)
        attrs = {
            "slide_id": entry.slide_id,
            "slide_path": str(Path(entry.path).resolve()),
            "level0_mpp": level0_mpp,
            "mpp_source": slide.mpp_source,
            "patch_size_level0": grid.patch_size_level0,
            "patch_level": patch_level,
            "patch_level_downsample": float(slide.level_downsamples[patch_level]),
            "level0_width": slide.dimensions[0],
            "level0_height": slide.dimensions[1],
            "n_tiles": len(grid.coords),
            **counts,
        }
    return SlideTiles(grid, thumb, mask, labels, counts, attrs)


def process_slide(entry: SlideEntry, cfg: PreprocessConfig) -> dict:
    """Preprocess one slide (:func:`tile_slide`, then its files); returns its manifest row
    (never raises for a bad slide)."""
    start = time.perf_counter()
    out = Path(cfg.out)
    row = _failed(entry)
    coords_path = out / "coords" / f"{entry.slide_id}.h5"
    params = cfg.tiling_params()
    try:
        done = _is_done(coords_path, params, entry)
        given = _given_files(cfg, entry.slide_id)
        if done is not None and any(  # a mask or annotation file changed: redo
            path is None or done.get(f"{name}_sha256") != sha256_file(path)
            for name, path in given.items()
        ):
            done = None
        if done is not None:
            row.update(
                status="skipped",
                n_tiles=int(done.get("n_tiles", 0)),
                **{k: int(done.get(k, 0)) for k in QUALITY_COUNTS},
                level0_mpp=done.get("level0_mpp", ""),
                mpp_source=done.get("mpp_source", ""),
            )
            return row
        _remove_stale_temporaries(out, entry.slide_id)
        tiles = tile_slide(entry, cfg, given)
        grid, thumb, attrs = tiles.grid, tiles.thumbnail, tiles.attrs
        row.update(
            level0_mpp=round(attrs["level0_mpp"], 6), mpp_source=attrs["mpp_source"], **tiles.counts
        )
        attrs = {
            **params,
            **attrs,
            **{f"{k}_sha256": sha256_file(v) for k, v in given.items() if v is not None},
        }
        if tiles.labels is not None:
            names, n = np.unique(tiles.labels, return_counts=True)
            attrs["label_counts"] = json.dumps(dict(zip(names.tolist(), n.tolist(), strict=True)))
        polygons = mask_polygons(tiles.mask)
        scale = thumb.shape[1] / attrs["level0_width"]  # thumbnail px per level-0 px
        geojson = polygons_to_geojson(
            polygons, (1 / scale, 1 / scale), {"slide_id": entry.slide_id}
        )
        atomic_write_text(out / "tissue" / f"{entry.slide_id}.geojson", json.dumps(geojson))
        if cfg.thumbnails:
            qc = draw_qc(
                thumb, polygons, grid.coords, grid.patch_size_level0, scale, cfg.thumbnail_size
            )
            write_jpeg(out / "thumbnails" / f"{entry.slide_id}.jpg", qc)
        # The coords file is written last: its presence marks the slide as done.
        write_coords(coords_path, grid.coords, grid.tissue_fraction, attrs, tiles.labels)
        row.update(status="ok", n_tiles=len(grid.coords))
    except PipelineError as exc:
        row["error"] = str(exc)
    except Exception as exc:  # a bug or an unforeseen file problem: keep going, keep the trace
        last = traceback.format_exc().strip().splitlines()[-1]
        row["error"] = f"{entry.path}: unexpected {type(exc).__name__}: {exc} ({last})"
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def _failed(entry: SlideEntry, error: str = "") -> dict:
    """A manifest row of ``entry`` marked failed (a worker fills it in as it goes)."""
    return {
        "slide_id": entry.slide_id,
        "path": str(entry.path),
        "status": "failed",
        "n_tiles": 0,
        "level0_mpp": "",
        "mpp_source": "",
        **dict.fromkeys(QUALITY_COUNTS, 0),
        "seconds": 0.0,
        "error": error,
    }


def _failed_row(entry: SlideEntry, exc: BaseException) -> dict:
    """The manifest row of a slide whose worker process did not return a row."""
    if isinstance(exc, BrokenProcessPool):
        error = (
            f"{entry.path}: the worker process died on this slide ({exc}); it was probably "
            "killed for memory or crashed in a native library. Rerun it alone with "
            "--workers 1, and check the file (convert it to a pyramidal TIFF if it is not "
            "one)."
        )
    else:
        error = f"{entry.path}: the worker process failed: {type(exc).__name__}: {exc}"
    return _failed(entry, error)


def _process_in_pool(entries: list[SlideEntry], cfg: PreprocessConfig, collect) -> None:
    """:func:`process_slide` over ``cfg.workers`` processes, surviving a worker's death.

    At most ``workers`` slides are in flight, so when a worker dies (killed for memory, a
    crash in OpenSlide) the culprit is among them: those slides are run again one at a
    time in a one-process pool, where a death names its slide, which fails; then a fresh
    pool takes the rest.
    """
    ctx = multiprocessing.get_context("spawn")
    queue, suspects = list(entries), []
    while queue or suspects:
        alone = bool(suspects)  # after a death: one slide at a time finds the culprit
        todo, workers = (suspects, 1) if alone else (queue, min(cfg.workers, len(queue)))
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            running: dict = {}
            broken = False
            while (todo or running) and not broken:
                while todo and len(running) < workers:
                    entry = todo.pop(0)
                    running[pool.submit(process_slide, entry, cfg)] = entry
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    entry = running.pop(fut)
                    try:
                        collect(fut.result())
                    except BrokenProcessPool as exc:
                        broken = True
                        if alone:
                            collect(_failed_row(entry, exc))
                        else:
                            suspects.append(entry)
                    except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be sent
                        collect(_failed_row(entry, exc))
            if broken and not alone:  # every slide still in flight failed with the pool
                wait(running)
                suspects += running.values()
                log.warning(
                    "a worker process died; retrying %d slides one at a time: %s",
                    len(suspects),
                    ", ".join(e.slide_id for e in suspects),
                )


def preprocess(cfg: PreprocessConfig, progress: bool = True) -> list[dict]:
    """Run preprocessing; returns the manifest rows of this run's shard."""
    cfg.validate()
    index, count = parse_shard(cfg.shard)
    out = Path(cfg.out)
    entries = shard_slides(list_slides(cfg.slides, cfg.level0_mpp, exclude=out), index, count)
    out.mkdir(parents=True, exist_ok=True)
    suffix = shard_suffix(index, count)
    save_config(cfg, out, f"config{suffix}.yaml")
    log.info("preprocess: %d slides (shard %d/%d) -> %s", len(entries), index, count, out)

    rows = []
    bar = tqdm(total=len(entries), unit="slide", desc="preprocess", disable=not progress)
    tiles = 0

    def collect(row: dict) -> None:
        nonlocal tiles
        rows.append(row)
        tiles += int(row["n_tiles"])
        bar.set_postfix(tiles=tiles, failed=sum(r["status"] == "failed" for r in rows))
        bar.update()
        if row["status"] == "failed":
            log.warning("%s failed: %s", row["slide_id"], row["error"])

    try:
        if cfg.workers <= 1 or len(entries) <= 1:
            for entry in entries:
                collect(process_slide(entry, cfg))
        else:
            _process_in_pool(entries, cfg, collect)
    finally:  # interrupted or not, the manifest lists every slide finished so far
        bar.close()
        write_manifest(out / f"manifest{suffix}.csv", rows, MANIFEST_FIELDS)
    return rows


def run(cfg: PreprocessConfig) -> int:
    start = time.perf_counter()
    rows = preprocess(cfg)
    status = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    tiles = sum(int(r["n_tiles"]) for r in rows)
    print(
        f"preprocess: {status['ok']} done, {status['skipped']} skipped, {status['failed']} "
        f"failed; {tiles} tiles at {cfg.target_mpp} mpp in {time.perf_counter() - start:.1f} s "
        f"-> {cfg.out} (cpath-pipeline {pipeline.__version__})"
    )
    for r in rows:
        if r["status"] == "failed":
            print(f"  failed {r['slide_id']}: {r['error']}")
    return 1 if status["failed"] else 0
