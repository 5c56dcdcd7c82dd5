"""Tissue outlines: the polygons of a mask hold exactly its pixels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import points_in_poly

from pipeline.wsi.contours import _signed_area, mask_polygons, polygons_to_geojson
from pipeline.wsi.reader import Slide
from pipeline.wsi.tissue import TissueConfig, make_tissue_detector


def _inside(polygons: list, points: np.ndarray) -> np.ndarray:
    """Points (``N x 2`` x, y) inside any polygon's exterior and none of its holes."""
    inside = np.zeros(len(points), bool)
    for exterior, *holes in polygons:
        here = points_in_poly(points, exterior)
        for hole in holes:
            here &= ~points_in_poly(points, hole)
        inside |= here
    return inside


def _blobs(seed: int, shape=(60, 80)) -> np.ndarray:
    """Random pieces with holes, one-pixel specks, lines and diagonal contacts."""
    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.5
    mask |= rng.random(shape) > 0.985  # specks
    mask[5, 10:40] = True  # a one-pixel line
    mask[20, 20] = mask[21, 21] = True  # corner contact
    mask[0, :5] = mask[-1, -5:] = True  # at the border
    return mask


def _check(mask: np.ndarray) -> None:
    polygons = mask_polygons(mask)
    rows, cols = np.indices(mask.shape)
    centres = np.stack([cols.ravel() + 0.5, rows.ravel() + 0.5], axis=1)  # pixel centres
    np.testing.assert_array_equal(_inside(polygons, centres).reshape(mask.shape), mask)
    # 8-connected pieces, one polygon each; pixel-edge outlines: the area is the pixel
    # count up to 1/8 px per concave corner
    assert len(polygons) == ndimage.label(mask, np.ones((3, 3)))[1]
    area = sum(abs(_signed_area(p[0])) - sum(abs(_signed_area(h)) for h in p[1:]) for p in polygons)
    corners = sum(len(ring) for p in polygons for ring in p)
    assert mask.sum() <= area <= mask.sum() + corners / 8


@pytest.mark.parametrize("seed", range(4))
def test_polygons_hold_exactly_the_mask_pixels(seed):
    _check(_blobs(seed))


def test_polygons_of_a_real_tissue_mask(cmu_svs):
    with Slide(cmu_svs) as slide:
        thumb = slide.thumbnail_at_mpp(8.0)
        mpp = slide.mpp * slide.dimensions[0] / thumb.shape[1]
    mask = make_tissue_detector(TissueConfig(mpp=8.0))(thumb, mpp)
    assert mask.sum() > 1000
    _check(mask)


def test_single_pixel_is_its_square_and_geojson_is_level0_px():
    mask = np.zeros((4, 5), bool)
    mask[1, 2] = True
    ((ring,),) = mask_polygons(mask)
    assert sorted(map(tuple, ring[:-1].tolist())) == [(2, 1), (2, 2), (3, 1), (3, 2)]
    feature = polygons_to_geojson([[ring]], (64.0, 64.0))["features"][0]
    exterior = np.asarray(feature["geometry"]["coordinates"][0])
    assert exterior.min(axis=0).tolist() == [128, 64] and exterior.max(axis=0).tolist() == [
        192,
        128,
    ]
    assert _signed_area(exterior) < 0  # counter-clockwise on screen, y growing downwards
