"""Tissue masks as polygons: GeoJSON for QuPath and outlines for QC images."""

from __future__ import annotations

import numpy as np
from skimage.measure import find_contours, label, regionprops


def drop_collinear(ring: np.ndarray) -> np.ndarray:
    """A closed ``K x 2`` ring without the points that lie on the straight line through
    their neighbours (exactly: the outline is unchanged), closed again."""
    points = ring[:-1]  # K-1 x 2, without the repeated first point
    before, after = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    d1, d2 = points - before, after - points
    turn = np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]) > 1e-9  # K-1
    kept = points[turn]
    return np.concatenate([kept, kept[:1]]) if len(kept) else ring


def mask_polygons(mask: np.ndarray) -> list[list[np.ndarray]]:
    """Polygons of a boolean mask: per connected piece, ``[exterior, *holes]`` rings.

    Rings are ``K x 2`` arrays of (x, y) in mask px (pixel-edge coordinates), closed
    (first point repeated last), with only the points where the outline turns.
    """
    polygons = []
    labels = label(mask, connectivity=2)
    for region in regionprops(labels):
        y0, x0, y1, x1 = region.bbox
        piece = np.pad(region.image, 1)  # one px of background around the piece
        rings = []
        for contour in find_contours(piece.astype(np.float32), 0.5):
            ring = drop_collinear(contour)
            if len(ring) < 4:
                continue
            xy = np.stack([ring[:, 1] + x0 - 0.5, ring[:, 0] + y0 - 0.5], axis=1)  # K x 2
            rings.append(xy)
        if not rings:
            continue
        areas = [abs(_signed_area(r)) for r in rings]
        exterior = int(np.argmax(areas))
        polygons.append([rings[exterior]] + [r for i, r in enumerate(rings) if i != exterior])
    return polygons


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def polygons_to_geojson(
    polygons: list[list[np.ndarray]], scale: tuple[float, float], properties: dict | None = None
) -> dict:
    """A GeoJSON FeatureCollection in level-0 px (``scale`` = level-0 px per mask px).

    Exterior rings are counter-clockwise and holes clockwise (RFC 7946); each piece is
    one ``Polygon`` feature classified as ``Tissue``, which QuPath imports as annotations.
    """
    features = []
    for rings in polygons:
        coords = []
        for i, ring in enumerate(rings):
            xy = ring * np.asarray(scale)
            ccw = _signed_area(xy) > 0  # y grows downwards: positive area is clockwise on screen
            if (i == 0) == ccw:
                xy = xy[::-1]
            coords.append(np.round(xy, 1).tolist())
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": coords},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tissue", "color": [0, 160, 0]},
                    **(properties or {}),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}
