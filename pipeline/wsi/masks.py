"""User-given tissue masks and labelled annotations, per slide.

A folder holds one file per slide, named by its slide id: ``<slide_id>.geojson`` (or
``.json``): polygons in level-0 px, as QuPath exports them (File > Export objects >
GeoJSON), a FeatureCollection, a list of features, one feature or one geometry, with
``Polygon`` and ``MultiPolygon`` geometries and their holes; or, for tissue masks only, a
mask image ``<slide_id>.png`` / ``.tif`` / ``.tiff`` spanning the whole slide at any
resolution (non-zero: tissue).

Polygons are drawn on a grid of ``MASK_UM`` um per px (at most ``MAX_MASK_SIDE`` px a
side); each tile's share of a mask is then its box's covered share, as for detected tissue
(:func:`pipeline.wsi.tiling.box_shares`). An annotation's class is QuPath's
``properties.classification.name`` (else ``properties.name``, else ``properties.label``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import PipelineError
from pipeline.wsi.tiling import box_shares

MASK_UM = 4.0  # um per px of the grid polygons are drawn on
MAX_MASK_SIDE = 16384
GEOJSON_SUFFIXES = (".geojson", ".json")
IMAGE_SUFFIXES = (".png", ".tif", ".tiff")


def find_mask_file(folder: str | Path, slide_id: str, suffixes: tuple[str, ...]) -> Path | None:
    """``folder/<slide_id><suffix>`` for the first suffix that exists, else None."""
    for suffix in suffixes:
        path = Path(folder) / f"{slide_id}{suffix}"
        if path.is_file():
            return path
    return None


def _features(data: object) -> list[dict]:
    if isinstance(data, list):
        return [f for item in data for f in _features(item)]
    if not isinstance(data, dict):
        return []
    if data.get("type") == "FeatureCollection":
        return _features(data.get("features", []))
    if data.get("type") == "Feature":
        return [data]
    if data.get("type") in ("Polygon", "MultiPolygon", "GeometryCollection"):
        return [{"type": "Feature", "geometry": data, "properties": {}}]
    return []


def _class_name(properties: dict | None) -> str:
    properties = properties or {}
    classification = properties.get("classification")
    if isinstance(classification, dict) and classification.get("name"):
        return str(classification["name"])
    if isinstance(classification, str) and classification:
        return classification
    return str(properties.get("name") or properties.get("label") or "")


def _polygons(geometry: dict) -> list[list[np.ndarray]]:
    kind = geometry.get("type")
    if kind == "Polygon":
        return [[np.asarray(r, np.float64)[:, :2] for r in geometry["coordinates"]]]
    if kind == "MultiPolygon":
        return [[np.asarray(r, np.float64)[:, :2] for r in p] for p in geometry["coordinates"]]
    if kind == "GeometryCollection":
        return [p for g in geometry.get("geometries", []) for p in _polygons(g)]
    return []  # points and lines cover no area


def read_geojson(path: str | Path) -> list[tuple[str, list[np.ndarray]]]:
    """``(class name, [exterior, *holes])`` of every polygon in a GeoJSON file (level-0 px)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        polygons = [
            (_class_name(f.get("properties")), rings)
            for f in _features(data)
            for rings in _polygons(f.get("geometry") or {})
            if rings and len(rings[0]) >= 3
        ]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise PipelineError(
            f"{path}: not a GeoJSON file of polygons ({type(exc).__name__}: {exc}); export "
            "the annotations from QuPath as GeoJSON (level-0 px)."
        ) from exc
    if not polygons:
        raise PipelineError(f"{path}: no Polygon or MultiPolygon in it")
    return polygons


def mask_grid(level0_size: tuple[int, int], level0_mpp: float) -> tuple[int, int]:
    """(width, height) of the grid polygons are drawn on: ``MASK_UM`` um per px, capped."""
    width, height = level0_size
    scale = min(level0_mpp / MASK_UM, MAX_MASK_SIDE / max(width, height))
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def draw_polygons(
    polygons: list[list[np.ndarray]], level0_size: tuple[int, int], grid: tuple[int, int]
) -> np.ndarray:
    """Boolean ``grid`` (width, height) mask of ``polygons`` (level-0 px; holes cut out)."""
    image = Image.new("1", grid, 0)
    draw = ImageDraw.Draw(image)
    sx, sy = grid[0] / level0_size[0], grid[1] / level0_size[1]
    for rings in polygons:
        for i, ring in enumerate(rings):
            xy = [(float(x) * sx, float(y) * sy) for x, y in ring]
            if len(xy) >= 3:
                draw.polygon(xy, fill=0 if i else 1)
    return np.asarray(image, bool)


def read_mask_image(path: str | Path, level0_size: tuple[int, int]) -> np.ndarray:
    """A mask image spanning the slide (non-zero: tissue), checked for the slide's shape."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            mask = np.asarray(image.convert("L")) > 0
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read the mask image ({exc})") from exc
    width, height = level0_size
    if abs(mask.shape[1] / mask.shape[0] - width / height) > 0.02 * width / height:
        raise PipelineError(
            f"{path}: a {mask.shape[1]} x {mask.shape[0]} px mask for a {width} x {height} px "
            "slide; a mask image must span the whole slide (same aspect ratio)."
        )
    return mask


def user_tissue_mask(
    folder: str | Path, slide_id: str, level0_size: tuple[int, int], level0_mpp: float
) -> tuple[np.ndarray, Path]:
    """The tissue mask given for ``slide_id`` in ``folder`` and its file."""
    path = find_mask_file(folder, slide_id, (*GEOJSON_SUFFIXES, *IMAGE_SUFFIXES))
    if path is None:
        raise PipelineError(
            f"no tissue mask for slide {slide_id} in {folder} (looked for {slide_id}.geojson, "
            ".json, .png, .tif, .tiff); add one, or leave out --tissue_mask for detection."
        )
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return read_mask_image(path, level0_size), path
    polygons = [rings for _, rings in read_geojson(path)]
    return draw_polygons(polygons, level0_size, mask_grid(level0_size, level0_mpp)), path


def annotation_labels(
    path: str | Path,
    level0_size: tuple[int, int],
    level0_mpp: float,
    coords: np.ndarray,
    size0: int,
    min_share: float,
) -> np.ndarray:
    """Per tile (``N x 2`` level-0 corners, ``size0`` px boxes), the class of the annotation
    covering most of it, if that covers at least ``min_share`` (else ``""``); ``N`` str."""
    polygons = read_geojson(path)
    grid = mask_grid(level0_size, level0_mpp)
    names = sorted({name for name, _ in polygons})
    shares = np.stack(
        [
            box_shares(
                draw_polygons([r for n, r in polygons if n == name], level0_size, grid),
                level0_size,
                coords,
                size0,
            )
            for name in names
        ]
    )  # C x N
    best = shares.argmax(axis=0)  # N
    labels = np.asarray(names, dtype=object)[best]
    labels[shares.max(axis=0) < min_share] = ""
    return labels.astype(str)


def cap_per_label(labels: np.ndarray, caps: dict[str, int], seed: int) -> np.ndarray:
    """Which tiles to keep so that each label in ``caps`` has at most its cap (a seeded
    sample of that label's tiles); labels not in ``caps`` keep all their tiles."""
    keep = np.ones(len(labels), bool)
    rng = np.random.default_rng(seed)
    for name, cap in sorted(caps.items()):
        index = np.flatnonzero(labels == name)
        if len(index) > cap:
            keep[rng.choice(index, size=len(index) - cap, replace=False)] = False
    return keep
