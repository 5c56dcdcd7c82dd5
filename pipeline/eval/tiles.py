"""Labelled tile sets for the tile-level tasks, and their frozen features (cached).

A tile task's ``data`` is one of

- a CSV of tiles in preprocessed slides: ``coords,index,label`` plus optional
  ``slide_id``, ``case_id`` (the patient), ``split`` (``train``/``test``: a fixed split
  instead of cross-validation) and ``site`` (for the robustness probes);
- a folder of images in class subfolders (``<label>/*.png``), or with ``train/`` and
  ``test/`` above the class subfolders (the layout of CRC-100K, MHIST, BACH ...). Folds
  (and bootstrap clusters) group the images by the task's ``groups`` (a CSV
  ``image,group``: the image's path under the folder or its file name, and its slide or
  patient) or ``group_pattern`` (a regular expression searched in each file name: its
  first group, or the whole match, names the slide or patient); without either, each
  image is its own group, which a warning flags where there is no fixed split;
- ``{coords: DIR, demo: DIR, per_slide: N, classes: tumour | tissue, test: cv | held-out}``:
  the demo cohorts' tiles labelled from their ground-truth masks, tumour / normal or by
  tissue class; ``cv`` cross-validates on the development cohort, ``held-out`` trains on
  it and tests on the held-out cohort (:func:`pipeline.data.demo.tile_labels`).

Cross-validation folds (and bootstrap clusters) group tiles by patient where the data
names one, a ``case_id`` column of the CSV or of the task's ``sites`` file (the slide
labels CSV ``slide_id,case_id,site``), else by slide: two slides of one patient never fall
on both sides of a split.

Features are computed once per encoder and tile set, with and without a fixed stain
shift (for the stain-robustness test), and cached in ``EVAL/cache/<encoder>/<task>.npz``
with a key (encoder weights, tile list, shift) that a rerun checks before reusing them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline.data.tiles import TileDataset
from pipeline.encoders import Encoder
from pipeline.errors import ConfigError, PipelineError
from pipeline.io import atomic_path
from pipeline.stain.augment import HEDJitter

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
STAIN_SHIFT = {"sigma": 0.2, "bias": 0.2, "seed": 0}  # a strong, fixed H&E shift of test tiles
log = logging.getLogger(__name__)


@dataclass
class TileSet:
    """Labelled tiles: where to read them, and per tile its label, slide (``groups``: the
    slide, or for image folders the given slide or patient), split, site and patient."""

    source: list[tuple[str, str | int]]  # (coords file, row) or (image file, 0)
    labels: np.ndarray
    groups: np.ndarray
    split: np.ndarray | None = None
    sites: np.ndarray | None = None
    patients: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def fold_groups(self) -> tuple[str, np.ndarray]:
        """``("patient", case ids)`` where patients are known, else ``("slide", slide ids)``:
        the clusters that folds and bootstrap resamples keep whole."""
        if self.patients is not None:
            return "patient", self.patients
        return "slide", self.groups

    def digest(self) -> str:
        text = json.dumps([self.source, self.labels.tolist(), self.groups.tolist()], default=str)
        return hashlib.sha256(text.encode()).hexdigest()


def _from_rows(rows: list[dict], where: Path) -> TileSet:
    def resolve(p: str) -> str:
        return str(Path(p) if Path(p).is_absolute() else where / p)

    try:
        source = [(resolve(r["coords"]), int(r["index"])) for r in rows]
        labels = np.array([str(r["label"]) for r in rows])
    except (KeyError, ValueError) as exc:
        raise PipelineError(
            f"{where}: labelled tiles need coords,index,label columns ({exc})"
        ) from exc
    groups = np.array(
        [r.get("slide_id") or Path(s).stem for r, (s, _) in zip(rows, source, strict=True)]
    )
    split = np.array([r["split"] for r in rows]) if rows and rows[0].get("split") else None
    sites = np.array([r["site"] for r in rows]) if rows and rows[0].get("site") else None
    patients = None
    if any(r.get("case_id") for r in rows):
        patients = _patients(groups, [r.get("case_id") or "" for r in rows], where)
    return TileSet(source, labels, groups, split, sites, patients)


def _patients(slides: np.ndarray, cases: list[str], where: str | os.PathLike) -> np.ndarray:
    """Each tile's patient from its slide's ``case_id`` (``cases``, "" where unknown: the
    slide is then its own patient); a slide under two patients is an error."""
    by_slide: dict[str, str] = {}
    for slide, case in zip(slides.tolist(), cases, strict=True):
        if case and by_slide.setdefault(slide, case) != case:
            raise PipelineError(
                f"{where}: slide {slide} has two case_id values "
                f"({by_slide[slide]}, {case}); give each slide one patient"
            )
    missing = sorted({s for s in slides.tolist() if s not in by_slide})
    if missing:
        log.warning(
            "%s: no case_id for %d slides (%s); each is its own patient in the folds",
            where,
            len(missing),
            ", ".join(missing[:3]),
        )
    return np.array([by_slide.get(s, f"slide:{s}") for s in slides.tolist()])


def image_groups(
    root: Path,
    images: list[Path],
    groups: str | os.PathLike | None = None,
    pattern: str | None = None,
) -> list[str]:
    """The slide or patient of each image of a folder ``root``: from the CSV ``groups``
    (``image,group``; image: the path under ``root`` or the file name), from the regular
    expression ``pattern`` searched in the file name (its first group or the whole match),
    or the image itself when neither is given."""
    if groups is not None and pattern is not None:
        raise ConfigError(f"tile data {root}: give groups or group_pattern, not both")
    if groups is not None:
        try:
            with open(groups, newline="") as f:
                by_image = {r["image"]: r["group"] for r in csv.DictReader(f)}
        except (OSError, KeyError) as exc:
            raise PipelineError(f"{groups}: cannot read image,group columns ({exc})") from exc
        found = [by_image.get(i.relative_to(root).as_posix(), by_image.get(i.name)) for i in images]
        lost = [str(i.relative_to(root)) for i, g in zip(images, found, strict=True) if not g]
        if lost:
            raise PipelineError(
                f"{groups}: no group for {len(lost)} images of {root} "
                f"({', '.join(lost[:3])}); add rows image,group for them"
            )
        return found
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(
                f"group_pattern '{pattern}': not a regular expression ({exc})"
            ) from exc
        matches = [regex.search(i.name) for i in images]
        lost = [i.name for i, m in zip(images, matches, strict=True) if m is None]
        if lost:
            raise PipelineError(
                f"group_pattern '{pattern}' does not match {len(lost)} file names "
                f"in {root} ({', '.join(lost[:3])})"
            )
        return [m.group(1) if regex.groups else m.group(0) for m in matches]
    return [i.stem for i in images]


def _image_folder(
    root: Path, groups: str | os.PathLike | None = None, pattern: str | None = None
) -> TileSet:
    parts = [d for d in ("train", "test") if (root / d).is_dir()]
    roots = [(root / d, d) for d in parts] if len(parts) == 2 else [(root, None)]
    images, labels, split = [], [], []
    for folder, role in roots:
        for class_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
            for image in sorted(class_dir.rglob("*")):
                if image.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(image)
                    labels.append(class_dir.name)
                    split.append(role)
    if groups is None and pattern is None and roots[0][1] is None:
        log.warning(
            "%s: images are not grouped by slide or patient, so cross-validation folds "
            "can put tiles of one slide on both sides; give the task groups (a CSV "
            "image,group) or group_pattern (a regular expression on file names)",
            root,
        )
    return TileSet(
        [(str(i), 0) for i in images],
        np.array(labels),
        np.array(image_groups(root, images, groups, pattern)),
        np.array(split) if roots[0][1] else None,
    )


def read_tile_set(
    data: str | os.PathLike | dict,
    sites: str | os.PathLike | None = None,
    groups: str | os.PathLike | None = None,
    group_pattern: str | None = None,
) -> TileSet:
    """The tile set a task names (see the module docstring); ``sites``: a CSV with
    ``slide_id,site`` and optionally ``case_id`` (the slide labels file) that gives each
    tile its slide's site and patient, where the tile data does not; ``groups`` /
    ``group_pattern``: the slide or patient of each image of an image folder (see
    :func:`image_groups`)."""
    folder = not isinstance(data, dict) and Path(data).is_dir()
    if (groups is not None or group_pattern is not None) and not folder:
        raise ConfigError(
            f"tile data {data}: groups and group_pattern are for image folders; "
            "a tiles CSV gives each tile's slide in its slide_id column"
        )
    if isinstance(data, dict):
        from pipeline.data.demo import tile_labels

        for key in ("coords", "demo"):
            if not Path(data.get(key, "")).is_dir():
                raise PipelineError(f"tile data {data}: '{key}' must be an existing folder")
        unknown = set(data) - {"coords", "demo", "per_slide", "seed", "classes", "test"}
        if unknown:
            raise ConfigError(
                f"tile data {data}: unknown keys {', '.join(sorted(unknown))} (coords, demo, "
                "per_slide, seed, classes: tumour | tissue, test: cv | held-out | all)"
            )
        try:
            rows = tile_labels(
                data["coords"],
                data["demo"],
                data.get("per_slide"),
                data.get("seed", 0),
                classes=data.get("classes", "tumour"),
                test=data.get("test", "cv"),
            )
        except ValueError as exc:
            raise ConfigError(f"tile data {data}: {exc}") from exc
        tiles = _from_rows(rows, Path(data["coords"]))
    else:
        path = Path(data)
        if path.is_dir():
            tiles = _image_folder(path, groups, group_pattern)
        elif path.is_file():
            with open(path, newline="") as f:
                tiles = _from_rows(list(csv.DictReader(f)), path.parent)
        else:
            raise PipelineError(
                f"{path}: tile data not found (a labelled-tiles CSV or an image folder)"
            )
    if len(tiles) == 0:
        raise PipelineError(f"{data}: no labelled tiles")
    if len(np.unique(tiles.labels)) < 2:
        raise PipelineError(
            f"{data}: only one class ({tiles.labels[0]}); a tile task needs two or more"
        )
    if sites is not None:
        try:
            with open(sites, newline="") as f:
                table = list(csv.DictReader(f))
            by_slide = {r["slide_id"]: r for r in table}
        except (OSError, KeyError) as exc:
            raise PipelineError(
                f"{sites}: cannot read the slide labels (slide_id,site[,case_id] "
                f"columns) for tile data {data} ({exc})"
            ) from exc
        if tiles.sites is None:
            tiles.sites = np.array([by_slide.get(g, {}).get("site") or "" for g in tiles.groups])
        if tiles.patients is None and any(r.get("case_id") for r in table):
            cases = [by_slide.get(g, {}).get("case_id") or "" for g in tiles.groups]
            tiles.patients = _patients(tiles.groups, cases, sites)
    return tiles


class TileImages(Dataset):
    """``3 x size x size`` uint8 tiles of a :class:`TileSet`, resized (antialiased)."""

    def __init__(self, tiles: TileSet, size: int):
        self.tiles, self.size = tiles, size
        coords = sorted(
            {s for s, _ in tiles.source if Path(s).suffix.lower() not in IMAGE_SUFFIXES}
        )
        self.slot = {c: i for i, c in enumerate(coords)}
        self.slides = TileDataset(coords) if coords else None

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> torch.Tensor:
        where, row = self.tiles.source[i]
        if where in self.slot:
            image = torch.from_numpy(
                self.slides.read(int(self.slides.offsets[self.slot[where]]) + int(row))
            )
        else:
            try:
                with Image.open(where) as im:
                    image = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
            except OSError as exc:
                raise PipelineError(f"{where}: cannot read the image ({exc})") from exc
        if image.shape[-1] != self.size or image.shape[-2] != self.size:
            image = (
                F.interpolate(
                    image[None].float(),
                    size=(self.size, self.size),
                    mode="bilinear",
                    antialias=True,
                )[0]
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
            )
        return image


@torch.inference_mode()
def embed_tiles(
    encoder: Encoder,
    tiles: TileSet,
    batch_size: int = 64,
    workers: int = 0,
    shift: bool = True,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """``{"features": N x D, "shifted": N x D}`` (the second after :data:`STAIN_SHIFT`)."""
    from tqdm import tqdm

    loader = DataLoader(
        TileImages(tiles, encoder.load_size), batch_size=batch_size, num_workers=workers
    )
    gen = torch.Generator().manual_seed(STAIN_SHIFT["seed"])
    jitter = HEDJitter(STAIN_SHIFT["sigma"], STAIN_SHIFT["bias"], generator=gen)
    feats, shifted = [], []
    for images in tqdm(loader, desc=f"embed {encoder.name}", disable=not progress, unit="batch"):
        images = images.to(device)
        feats.append(encoder.embed(images).float().cpu())
        if shift:
            shifted.append(encoder.embed(jitter(images)).float().cpu())
    out = {"features": torch.cat(feats).numpy()}
    if shift:
        out["shifted"] = torch.cat(shifted).numpy()
    return out


def cached_features(path: Path, key: dict, compute) -> dict[str, np.ndarray]:
    """Features from ``path`` when its key matches ``key``, else ``compute()`` saved there."""
    text = json.dumps(key, sort_keys=True, default=str)
    if path.is_file():
        with np.load(path) as saved:
            if str(saved["key"]) == text:
                return {k: saved[k] for k in saved.files if k != "key"}
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, key=np.array(text), **out)
    return out
