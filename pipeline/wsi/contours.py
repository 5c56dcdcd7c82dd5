"""Tissue masks as polygons: GeoJSON for QuPath and outlines for QC images."""

from __future__ import annotations

import cv2
import numpy as np


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
    """Polygons of a boolean mask: per 8-connected piece, ``[exterior, *holes]`` rings.

    Rings are ``K x 2`` arrays of (x, y) in mask px, pixel-edge coordinates (pixel
    ``(i, j)`` spans ``[j, j + 1] x [i, i + 1]``), closed (first point repeated last),
    with only the points where the outline turns. They follow the pixels' edges exactly,
    except that a concave corner is cut by a half-pixel diagonal (1/8 px of area).

    OpenCV traces the outlines (``findContours``, as CLAM and TRIDENT do) on a lattice of
    the mask's pixel centres, edges and corners: a lattice point is set when a mask pixel
    touches it, so the outline of the set points runs along the pixels' edges rather than
    through the centres of the boundary pixels, half a pixel inside.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return []
    top, left = int(rows[0]), int(cols[0])
    crop = mask[top : rows[-1] + 1, left : cols[-1] + 1]
    h, w = crop.shape
    # 2h+1 x 2w+1 lattice, one point of padding around: pixel (i, j) is point (2i+2, 2j+2)
    lattice = np.zeros((2 * h + 3, 2 * w + 3), np.uint8)
    lattice[2:-2:2, 2:-2:2] = crop
    lattice = cv2.dilate(lattice, np.ones((3, 3), np.uint8))  # its edges and corners
    contours, hierarchy = cv2.findContours(lattice, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]  # K x 4: next, previous, first child, parent

    def ring(contour: np.ndarray) -> np.ndarray:
        xy = contour[:, 0, :].astype(np.float64) / 2 + (left - 0.5, top - 0.5)  # K x 2
        return drop_collinear(np.concatenate([xy, xy[:1]]))

    polygons = []
    for i in np.flatnonzero(hierarchy[:, 3] < 0):  # exteriors: no parent
        rings = [ring(contours[i])]
        child = hierarchy[i, 2]
        while child >= 0:
            rings.append(ring(contours[child]))
            child = hierarchy[child, 0]
        polygons.append([r for r in rings if len(r) >= 4])
    return [p for p in polygons if p and len(p[0]) >= 4]


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def polygons_to_geojson(
    polygons: list[list[np.ndarray]], scale: tuple[float, float], properties: dict | None = None
) -> dict:
    """A GeoJSON FeatureCollection in whole level-0 px (``scale`` = level-0 px per mask px).

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
            coords.append(np.rint(xy).astype(np.int64).tolist())
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
