"""Tissue detection and pen-ink removal on real H&E (the CMU slide, the carcinoma image)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import line

from pipeline.wsi.reader import Slide
from pipeline.wsi.tissue import TissueConfig, ink_mask, make_tissue_detector

CARCINOMA_MPP = 0.5  # the carcinoma PNG has no resolution metadata
MARKERS = {"blue": (40, 60, 150), "green": (40, 120, 70), "black": (35, 35, 40)}


def _thumbnail(sources: dict, name: str, mpp: float) -> tuple[np.ndarray, float]:
    """A real image read as the pipeline reads it: a thumbnail at about ``mpp`` um per px."""
    level0_mpp = CARCINOMA_MPP if name == "carcinoma" else None
    with Slide(sources[name], level0_mpp=level0_mpp) as slide:
        thumb = slide.thumbnail_at_mpp(mpp)
        return thumb, slide.mpp * slide.dimensions[0] / thumb.shape[1]


def _detect(thumb: np.ndarray, mpp: float, exclude_pen: bool) -> np.ndarray:
    return make_tissue_detector(TissueConfig(mpp=mpp, exclude_pen=exclude_pen))(thumb, mpp)


@pytest.mark.parametrize("name", ["cmu", "carcinoma"])
@pytest.mark.parametrize("tissue_mpp", [16.0, 8.0, 2.0])
def test_ink_removal_keeps_real_he_without_ink(sources, name, tissue_mpp):
    """Nuclei-dense H&E (haematoxylin is blue-violet, some of it dark) is not taken for ink:
    on images without pen marks, tissue with ink removal on and off differs by < 1%."""
    thumb, mpp = _thumbnail(sources, name, tissue_mpp)
    on, off = _detect(thumb, mpp, True), _detect(thumb, mpp, False)
    assert off.mean() > 0.2, f"{name}: little tissue found ({off.mean():.1%})"
    changed = (on ^ off).sum() / off.sum()
    assert changed < 0.01, f"{name} at {mpp:.2f} mpp: ink removal changed {changed:.2%} of tissue"


def _draw_stroke(
    thumb: np.ndarray, mpp: float, color: tuple[int, int, int], width_um: float
) -> tuple[np.ndarray, np.ndarray]:
    """A marker stroke blended over ``thumb`` across its middle: ink opacity 0.9 at the
    centre, fading over 16 um at the edges. Returns the image and the stroke's distance
    from its centre line in um."""
    h, w = thumb.shape[:2]
    centre = np.zeros((h, w), bool)
    points = [(0.15 * h, 0.05 * w), (0.45 * h, 0.35 * w), (0.55 * h, 0.6 * w), (0.9 * h, 0.95 * w)]
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:], strict=True):
        rr, cc = line(round(y0), round(x0), round(y1), round(x1))
        centre[rr, cc] = True
    distance = ndimage.distance_transform_edt(~centre) * mpp
    opacity = 0.9 * np.clip((width_um / 2 - distance) / 16.0 + 0.5, 0.0, 1.0)[..., None]
    inked = (1 - opacity) * thumb + opacity * np.asarray(color, np.float64)
    return np.clip(inked + 0.5, 0, 255).astype(np.uint8), distance


@pytest.mark.parametrize("name", ["cmu", "carcinoma"])
@pytest.mark.parametrize("marker", list(MARKERS))
def test_marker_strokes_are_removed_and_tissue_beside_them_kept(sources, name, marker):
    """Blue, green and black marker in realistic colours, drawn over tissue (and glass on
    the CMU slide): the whole stroke is ink and leaves the tissue mask; nothing beside
    it is ink, and on the slide (tissue on glass) the tissue beside it stays."""
    thumb, mpp = _thumbnail(sources, name, 4.0)
    inked, distance = _draw_stroke(thumb, mpp, MARKERS[marker], width_um=200.0)
    clean = _detect(thumb, mpp, exclude_pen=False)
    mask = _detect(inked, mpp, exclude_pen=True)
    ink = ink_mask(inked, mpp)
    stroke = distance < 100.0 - 8.0  # ink at least half opaque
    away = distance > 100.0 + 40.0
    on_tissue = stroke & clean
    assert on_tissue.sum() > 500
    assert ink[stroke].mean() > 0.95, f"{marker} stroke not found whole"
    assert (mask & on_tissue).sum() / on_tissue.sum() < 0.02, f"{marker} ink kept as tissue"
    assert ink[away].mean() < 0.01, f"{ink[away].mean():.1%} of the image beside the stroke is ink"
    if name == "cmu":  # a slide: tissue and glass (the carcinoma image is tissue only)
        lost = (clean & ~mask & away).sum() / (clean & away).sum()
        assert lost < 0.02, f"{marker} ink removal took {lost:.1%} of the tissue beside it"


def test_ink_colour_rules_on_every_8bit_colour():
    """The 8-bit ink rules equal their definitions in signed arithmetic, on all 2^24 colours."""
    from pipeline.wsi import tissue as t

    values = np.arange(2**24, dtype=np.uint32)
    rgb = np.stack([values >> 16, (values >> 8) & 255, values & 255], axis=-1).astype(np.uint8)
    ink, edge = t.ink_colours(rgb.reshape(4096, 4096, 3))
    r, g, b = (rgb[:, i].astype(np.int32) for i in range(3))
    high = np.maximum(np.maximum(r, g), b)
    chroma = high - np.minimum(np.minimum(r, g), b)
    blue_over, green_over = b - np.maximum(r, g), g - r
    want = ((blue_over > t.INK_BLUE_OVER_RG) & (green_over > 0)) | (green_over > t.INK_GREEN_OVER_R)
    want |= (high < t.INK_BLACK_MAX) & (chroma < np.maximum(t.INK_BLACK_CHROMA, high // 4))
    want_edge = (blue_over > t.INK_EDGE_BLUE_OVER_RG) | (green_over > t.INK_EDGE_GREEN_OVER_R)
    want_edge |= (high < t.INK_EDGE_BLACK_MAX) & (
        chroma < np.maximum(t.INK_EDGE_BLACK_CHROMA, high * 2 // 5)
    )
    np.testing.assert_array_equal(ink.ravel(), want)
    np.testing.assert_array_equal(edge.ravel(), want_edge)


@pytest.mark.parametrize("name", ["cmu", "carcinoma"])
@pytest.mark.parametrize("marker", ["none", *MARKERS])
def test_detection_in_its_window_equals_detection_over_the_whole_image(sources, name, marker):
    """Only the window that can hold tissue or ink is worked on; the mask is the same as
    when the whole image is, with and without ink (its strokes widen the window). The
    image is set on noisy glass, a slide's usual surroundings, so the window is a part."""
    import cv2

    thumb, mpp = _thumbnail(sources, name, 4.0)
    if marker != "none":
        thumb, _ = _draw_stroke(thumb, mpp, MARKERS[marker], width_um=200.0)
    h, w = thumb.shape[:2]
    rng = np.random.default_rng(0)
    glass = rng.normal((238, 237, 239), 1.0, (2 * h, 2 * w, 3))
    image = np.clip(glass, 0, 255).astype(np.uint8)
    image[h // 2 : h // 2 + h, w // 3 : w // 3 + w] = thumb
    detector = make_tissue_detector(TissueConfig(mpp=4.0))
    _, sat, value = cv2.split(cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL))
    rows, cols = detector.window(sat, value, mpp)
    assert (rows.stop - rows.start) * (cols.stop - cols.start) < 0.4 * sat.size
    whole = detector.detect(image, sat, value, mpp, (slice(None), slice(None)))
    assert whole.sum() > 0.1 * h * w
    np.testing.assert_array_equal(detector(image, mpp), whole)


def test_holes_are_filled_by_size_and_glass_at_the_border_is_not_a_hole():
    """Holes: background pieces (4-connected) that do not reach the border, filled up to
    the size given (scipy's fill of enclosed background, then a size filter)."""
    from pipeline.wsi.tissue import _fill_holes, _remove_small

    rng = np.random.default_rng(3)
    mask = ndimage.gaussian_filter(rng.random((90, 120)), 1.5) > 0.48
    enclosed = ndimage.binary_fill_holes(mask) & ~mask
    labels, n = ndimage.label(enclosed)
    sizes = np.bincount(labels.ravel())
    for max_size in (1, 4, 30, 10_000):
        want = mask | (enclosed & (sizes <= max_size)[labels])
        np.testing.assert_array_equal(_fill_holes(mask, max_size), want)
    assert n > 5 and (~mask[0]).any()  # holes of several sizes, and glass at the border
    pieces, _ = ndimage.label(mask)
    areas = np.bincount(pieces.ravel())
    want = mask & (areas > 12)[pieces]
    np.testing.assert_array_equal(_remove_small(mask, 12), want)
