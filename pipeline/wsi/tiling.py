"""A slide-wide tile grid at a target resolution, filtered by tissue share.

Tile size and overlap are in px at the target mpp; the grid is laid over level 0 with
a step of ``(tile_size - overlap) * target_mpp / level0_mpp`` level-0 px, starting at
(0, 0); only tiles fully inside the slide are kept. The tissue share of every tile is
computed at once from a summed-area table of the tissue mask (no per-tile polygon
tests), with the mask's pixels weighted by how much of each one a tile covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Grid:
    """Tiles of one slide: level-0 top-left corners and their tissue share."""

    coords: np.ndarray  # N x 2 int64, level-0 (x, y)
    tissue_fraction: np.ndarray  # N float32 in [0, 1]
    patch_size_level0: int  # level-0 px per tile side


def _summed_area(mask: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column (integer counts: exact, and
    faster to build than floats)."""
    dtype = np.int32 if mask.size < 2**31 else np.int64
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype)
    np.cumsum(mask, axis=0, dtype=dtype, out=table[1:, 1:])
    np.cumsum(table[1:, 1:], axis=1, out=table[1:, 1:])
    return table


def _area_lookup(table: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Integral of the mask over ``[0, y) x [0, x)`` at fractional mask coordinates.

    Bilinear interpolation of the summed-area table is exact for a piecewise-constant
    mask: the sum over whole pixels plus the covered share of the partial ones.
    """
    h, w = table.shape[0] - 1, table.shape[1] - 1
    y, x = np.clip(y, 0, h), np.clip(x, 0, w)
    y0, x0 = (
        np.minimum(np.floor(y).astype(np.int64), h - 1),
        np.minimum(np.floor(x).astype(np.int64), w - 1),
    )
    fy, fx = y - y0, x - x0
    a, b = table[y0, x0].astype(np.float64), table[y0, x0 + 1].astype(np.float64)
    c, d = table[y0 + 1, x0].astype(np.float64), table[y0 + 1, x0 + 1].astype(np.float64)
    return a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx


def box_shares(
    mask: np.ndarray, level0_size: tuple[int, int], coords: np.ndarray, size0: int
) -> np.ndarray:
    """Share of each level-0 box (``N x 2`` top-left corners, ``size0`` px square) that
    ``mask`` covers (``N`` float32 in [0, 1]); ``mask`` spans the slide (``level0_size``:
    width, height) at any resolution, its pixels weighted by how much of each a box covers."""
    width, height = level0_size
    sy, sx = mask.shape[0] / height, mask.shape[1] / width  # mask px per level-0 px
    left, top, w, h = cv2.boundingRect(mask.view(np.uint8))
    shares = np.zeros(len(coords), np.float32)
    if w == 0 or h == 0:
        return shares
    # the table over the mask's bounding box only (slides are mostly glass), and only the
    # boxes that reach into it looked up
    x0, y0 = coords[:, 0] * sx - left, coords[:, 1] * sy - top
    x1, y1 = x0 + size0 * sx, y0 + size0 * sy
    hit = np.flatnonzero((x1 > 0) & (x0 < w) & (y1 > 0) & (y0 < h))
    x0, x1, y0, y1 = x0[hit], x1[hit], y0[hit], y1[hit]
    table = _summed_area(mask[top : top + h, left : left + w])
    inside = (
        _area_lookup(table, y1, x1)
        - _area_lookup(table, y0, x1)
        - _area_lookup(table, y1, x0)
        + _area_lookup(table, y0, x0)
    )
    shares[hit] = np.clip(inside / np.maximum((x1 - x0) * (y1 - y0), 1e-12), 0.0, 1.0)
    return shares


def tile_grid(
    level0_size: tuple[int, int],
    level0_mpp: float,
    target_mpp: float,
    tile_size: int,
    overlap: int,
    mask: np.ndarray,
    min_tissue: float,
) -> Grid:
    """Tiles of ``tile_size`` px at ``target_mpp`` whose tissue share is >= ``min_tissue``.

    Args:
        level0_size: slide (width, height) in level-0 px.
        level0_mpp: slide resolution, um per level-0 px.
        target_mpp: tile resolution, um per px.
        tile_size: tile side in px at ``target_mpp``.
        overlap: overlap of neighbouring tiles in px at ``target_mpp``.
        mask: tissue mask covering the whole slide (any resolution; its extent is the slide's).
        min_tissue: lowest tissue share of a kept tile, 0-1.
    """
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size), got {overlap} for {tile_size}")
    width, height = level0_size
    scale = target_mpp / level0_mpp  # level-0 px per target px
    size0 = round(tile_size * scale)
    step0 = (tile_size - overlap) * scale
    nx = int(np.floor((width - size0) / step0)) + 1 if width >= size0 else 0
    ny = int(np.floor((height - size0) / step0)) + 1 if height >= size0 else 0
    xs = np.round(np.arange(nx) * step0).astype(np.int64)
    ys = np.round(np.arange(ny) * step0).astype(np.int64)
    gx, gy = np.meshgrid(xs, ys)  # ny x nx
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)  # N x 2

    fraction = box_shares(mask, level0_size, coords, size0)
    keep = fraction >= min_tissue if min_tissue > 0 else np.ones(len(coords), bool)
    return Grid(coords[keep], fraction[keep], size0)
