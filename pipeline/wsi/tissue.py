"""Tissue detection on a low-resolution image of the slide (a pyramid level near 16 um per px).

Detectors share one small interface: a callable taking an RGB uint8 thumbnail and its
resolution (um per px) and returning a boolean tissue mask of the same height and
width. They register by name in :data:`TISSUE_METHODS`; a learned segmenter is one more
class with ``@register_tissue_method("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from skimage.filters import threshold_otsu
from skimage.morphology import disk

TissueDetector = Callable[[np.ndarray, float], np.ndarray]
TISSUE_METHODS: dict[str, type] = {}


def register_tissue_method(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        TISSUE_METHODS[name] = cls
        return cls

    return add


@dataclass
class TissueConfig:
    """Tissue detection settings.

    Args:
        method: registered detector name (``hsv_otsu``).
        mpp: resolution tissue is detected at, um per px: the slide's coarsest pyramid level at most 1.25x coarser is read as it is (a 16-um level, or an 8-um one when the next is 32), or, without a level between half and 1.25x this, the slide is read in chunks and downsampled to it.
        min_area_um2: connected pieces smaller than this are debris and dropped.
        max_hole_um2: holes inside tissue smaller than this are filled.
        closing_um: radius of the morphological closing that joins nearby fragments.
        min_saturation: lowest accepted Otsu threshold on HSV saturation (0-1).
        exclude_pen: remove blue, green and black marker strokes (colours H&E never takes).
        pale_tissue: also keep faint H&E-coloured tissue whose saturation lies between the glass and strongly stained tissue (a second Otsu threshold below the first, used when such a class exists).
    """

    method: str = "hsv_otsu"
    mpp: float = 16.0
    min_area_um2: float = 5000.0
    max_hole_um2: float = 50000.0
    closing_um: float = 16.0
    min_saturation: float = 0.05
    exclude_pen: bool = True
    pale_tissue: bool = True


def make_tissue_detector(cfg: TissueConfig) -> TissueDetector:
    """Instantiate the detector named by ``cfg.method``."""
    if cfg.method not in TISSUE_METHODS:
        known = ", ".join(sorted(TISSUE_METHODS))
        raise ValueError(f"unknown tissue method '{cfg.method}'; known: {known}")
    return TISSUE_METHODS[cfg.method](cfg)


def to_hsv8(rgb: np.ndarray) -> np.ndarray:
    """HSV of an RGB uint8 image as uint8, each 0-255 (OpenCV's full-range conversion)."""
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV_FULL)


def _kernel(radius: float) -> np.ndarray:
    """A disk of ``radius`` px as an OpenCV structuring element (scikit-image's disk)."""
    return disk(radius).astype(np.uint8)


def _morph(mask: np.ndarray, op: int, radius: float) -> np.ndarray:
    """Binary morphology of a boolean mask by a disk, the outside counting as background
    (as scipy's ``border_value=0``)."""
    out = cv2.morphologyEx(
        mask.view(np.uint8),
        op,
        _kernel(radius),
        borderType=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return out.view(bool)


def _piece_areas(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels of ``mask``'s connected pieces (``H x W`` int32, 0 = not in the mask) and the
    px count of each label (label 0's count is meaningless)."""
    _, labels = cv2.connectedComponents(mask.view(np.uint8), connectivity=connectivity)
    return labels, np.bincount(labels.ravel())


def _drop_labels(mask: np.ndarray, labels: np.ndarray, drop: np.ndarray) -> np.ndarray:
    """``mask`` without the pieces whose label ``drop`` flags."""
    drop[0] = False  # the background label
    return mask & ~np.take(drop, labels) if drop.any() else mask.copy()


def _remove_small(mask: np.ndarray, max_size: int) -> np.ndarray:
    """``mask`` without its 4-connected pieces of at most ``max_size`` px (as scikit-image's
    ``remove_small_objects(mask, max_size=...)``)."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    kept = mask.copy()
    if w and h:  # the pieces lie in the mask's bounding box
        box = mask[y : y + h, x : x + w]
        labels, areas = _piece_areas(box, 4)
        kept[y : y + h, x : x + w] = _drop_labels(box, labels, areas <= max_size)
    return kept


def _fill_holes(mask: np.ndarray, max_size: int) -> np.ndarray:
    """``mask`` with its holes of at most ``max_size`` px filled: 4-connected pieces of
    background that do not reach the image's border (those are glass around the tissue)."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    if w == 0 or h == 0:
        return mask.copy()
    # the background outside the mask's bounding box reaches the border: flood it from a
    # one-px frame around the box; what it does not reach, and is not mask, is a hole
    reached = np.pad(mask[y : y + h, x : x + w], 1).astype(np.uint8)  # h+2 x w+2
    cv2.floodFill(reached, None, (0, 0), 1)
    holes = reached == 0
    if not holes.any():
        return mask.copy()
    labels, areas = _piece_areas(holes, 4)
    filled = mask.copy()
    filled[y : y + h, x : x + w] |= _drop_labels(holes, labels, areas > max_size)[1:-1, 1:-1]
    return filled


def _connected_to(seed: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The 4-connected pieces of ``allowed`` that hold a ``seed`` pixel (reconstruction by
    dilation, as scipy's ``binary_propagation``)."""
    allowed = allowed | seed
    _, labels = cv2.connectedComponents(allowed.view(np.uint8), connectivity=4)
    hit = np.zeros(labels.max() + 1, bool)
    hit[labels[seed]] = True
    hit[0] = False
    return np.take(hit, labels)


def histogram8(values: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Counts (256, int64) of the 8-bit ``values`` at the pixels ``where`` is true."""
    rows = max(1, 2**24 // max(1, values.shape[1]))  # float32 counts stay exact below 2**24
    counts = np.zeros(256, np.int64)
    for top in range(0, values.shape[0], rows):
        part = cv2.calcHist(
            [values[top : top + rows]], [0], where[top : top + rows].view(np.uint8), [256], (0, 256)
        )
        counts += part.ravel().astype(np.int64)
    return counts


def otsu8(counts: np.ndarray) -> float:
    """Otsu's threshold (scikit-image's) of a histogram of 8-bit values, ``counts[v]`` the
    number of pixels of value ``v``: values above it are the upper class."""
    return float(threshold_otsu(hist=(counts, np.arange(len(counts)))))


# Pen-ink colour rules, on 0-255 RGB. Established pen filters (the deep-histopath / HistomicsTK
# family) flag blue ink as "R low, B high" and green ink as "R low, G and B high": marker ink
# lies on the cyan side of the colour wheel, with more green than red. H&E does not go
# there: haematoxylin is violet-blue (G at or below R, however blue or dark), eosin pink
# (G lowest). A few pixels of real H&E reach these colours at full resolution (nucleus
# edges, tissue-marking dye grains), never a stroke of them: ink must also form a stroke.
INK_BLUE_OVER_RG = 30  # blue ink: B exceeds max(R, G) by this, and G exceeds R
INK_GREEN_OVER_R = 25  # green ink (green to teal): G exceeds R by this
INK_BLACK_MAX = 100  # black ink: every channel below this ...
INK_BLACK_CHROMA = 24  # ... and max - min below this or a quarter of the max (grey)
# Looser colours that extend a stroke found by the rules above into its faint or
# tissue-blended edges (hysteresis): only pixels connected to a stroke are taken.
INK_EDGE_BLUE_OVER_RG = 15
INK_EDGE_GREEN_OVER_R = 10
INK_EDGE_BLACK_MAX = 120
INK_EDGE_BLACK_CHROMA = 30  # or 40% of the max
INK_MIN_WIDTH_UM = 24.0  # ink counts where it forms a stroke this wide, which specks do not


def _stroke_cores(ink: np.ndarray, radius_px: float) -> np.ndarray:
    """Pixels of ``ink`` whose every neighbour within ``radius_px`` is ink too (the image
    border counts as ink): the cores of strokes wider than twice the radius."""
    k = int(radius_px)
    if radius_px < 1:  # no neighbour within the radius: every ink pixel is a core
        return ink.copy()
    if k <= 3:  # erosion by a small disk is faster than a distance transform
        yy, xx = np.ogrid[-k : k + 1, -k : k + 1]
        disk_ = xx * xx + yy * yy <= radius_px * radius_px
        eroded = cv2.erode(
            ink.view(np.uint8),
            disk_.astype(np.uint8),
            borderType=cv2.BORDER_CONSTANT,
            borderValue=1,
        )
        return eroded.view(bool)
    distance = cv2.distanceTransform(
        np.pad(ink, 1, constant_values=True).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE
    )[1:-1, 1:-1]
    return distance > radius_px


# The grey tests as tables over the max channel h: the chroma (max - min) a pixel must stay
# under to be black ink, 0 (never) where h is not dark enough.
_H = np.arange(256)
_BLACK = np.where(_H < INK_BLACK_MAX, np.maximum(INK_BLACK_CHROMA, _H // 4), 0).astype(np.uint8)
_EDGE_BLACK = np.where(
    _H < INK_EDGE_BLACK_MAX, np.maximum(INK_EDGE_BLACK_CHROMA, _H * 2 // 5), 0
).astype(np.uint8)


def _ink_measures(rgb: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per pixel of an RGB uint8 image, in 8-bit arithmetic: the max channel, the chroma
    (max - min), B over max(R, G) and G over R (differences saturate at 0, which the
    rules' positive margins never see)."""
    r, g, b = cv2.split(np.ascontiguousarray(rgb))
    rg = cv2.max(r, g)
    high = cv2.max(rg, b)
    chroma = cv2.subtract(high, cv2.min(cv2.min(r, g), b))
    return high, chroma, cv2.subtract(b, rg), cv2.subtract(g, r)


def _ink_colour(high, chroma, blue_over, green_over) -> np.ndarray:
    ink = ((blue_over > INK_BLUE_OVER_RG) & (green_over > 0)) | (green_over > INK_GREEN_OVER_R)
    return ink | (chroma < cv2.LUT(high, _BLACK))  # the grey test as a table look-up


def _edge_colour(high, chroma, blue_over, green_over) -> np.ndarray:
    edge = (blue_over > INK_EDGE_BLUE_OVER_RG) | (green_over > INK_EDGE_GREEN_OVER_R)
    return edge | (chroma < cv2.LUT(high, _EDGE_BLACK))


def ink_colours(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ink rules' colours on an RGB uint8 image, pixel by pixel: ``(ink, edge)``, the
    pen-ink colours and the looser ones of a stroke's edges (see the rule constants)."""
    measures = _ink_measures(rgb)
    return _ink_colour(*measures), _edge_colour(*measures)


def ink_mask(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Marker strokes on an RGB uint8 image at ``mpp`` um per px: blue, green and black ink.

    A pixel is ink when its colour is one H&E never takes: blue with G above R (the cyan
    side of blue; haematoxylin is violet-blue), green above red by a margin, or dark and
    grey (black ink; dark but saturated nuclei are not grey). Ink counts only where it
    forms a stroke at least ``INK_MIN_WIDTH_UM`` wide, which a pen draws and ink-coloured
    specks (dust, tissue-marking dye grains) do not; each stroke then takes the connected
    pixels of ink-like colour around it (its faint and tissue-blended edges).
    """
    measures = _ink_measures(rgb)
    ink = _ink_colour(*measures)
    core = _stroke_cores(ink, INK_MIN_WIDTH_UM / 2 / mpp)
    if not core.any():
        return core
    return _connected_to(core, ink | _edge_colour(*measures))


# Faint tissue beside strongly stained tissue: Otsu's threshold on saturation then falls
# between the faint and the strong tissue, not between glass and tissue. A second Otsu
# below the first splits glass from the faint class; it is used when that class holds at
# least PALE_MIN_SHARE of the pixels and lies PALE_MIN_SEPARATION glass standard
# deviations above the glass, and only for H&E-coloured pixels (green the lowest channel:
# eosin pink, haematoxylin violet; not blue or green ink halos, not bluish glass) that form
# solid regions (a one-px opening drops the partial pixels along tissue and ink edges).
PALE_MIN_SHARE = 0.02
PALE_MIN_SEPARATION = 3.0


def pale_tissue_mask(
    rgb: np.ndarray,
    sat: np.ndarray,
    usable: np.ndarray,
    counts: np.ndarray,
    threshold: float,
    floor: float,
) -> np.ndarray:
    """Faint H&E-coloured tissue among the ``usable`` pixels of 8-bit saturation ``sat``
    (histogram ``counts``) at or below ``threshold``, the first Otsu threshold; empty when
    the saturations below it hold no such class. ``floor``: the lowest threshold accepted."""
    low = counts[: int(np.floor(threshold)) + 1]  # the histogram at or below the threshold
    values = np.arange(len(low), dtype=np.float64)
    if low.sum() < 100 or np.count_nonzero(low) < 2:
        return np.zeros(sat.shape, bool)
    second = otsu8(low)
    glass, pale = values <= second, values > second
    n_glass, n_pale = low[glass].sum(), low[pale].sum()
    if second < floor or n_glass == 0 or n_pale < PALE_MIN_SHARE * counts.sum():
        return np.zeros(sat.shape, bool)
    glass_mean = (low[glass] * values[glass]).sum() / n_glass
    glass_sd = np.sqrt((low[glass] * (values[glass] - glass_mean) ** 2).sum() / n_glass)
    pale_mean = (low[pale] * values[pale]).sum() / n_pale
    if pale_mean - glass_mean < PALE_MIN_SEPARATION * glass_sd:
        return np.zeros(sat.shape, bool)
    r, g, b = cv2.split(np.ascontiguousarray(rgb))
    faint = usable & (sat > second) & (sat <= threshold) & (g < r) & (g < b)
    return _morph(faint, cv2.MORPH_OPEN, 1)


@register_tissue_method("hsv_otsu")
class HSVOtsu:
    """Otsu threshold on HSV saturation with morphology and ink exclusion (as in CLAM).

    Saturation separates stained tissue from glass; Otsu's threshold adapts to each
    slide's stain strength, and a second one below it keeps faint tissue that sits beside
    strongly stained tissue (:func:`pale_tissue_mask`); both on the 8-bit histogram.
    Closing joins fragments, small holes are filled and pieces below ``min_area_um2``
    dropped; pen ink is removed before and after.
    """

    def __init__(self, cfg: TissueConfig):
        self.cfg = cfg

    def __call__(self, thumbnail: np.ndarray, mpp: float) -> np.ndarray:
        _, sat, value = cv2.split(to_hsv8(thumbnail))  # H x W uint8 each
        return self.detect(thumbnail, sat, value, mpp, self.window(sat, value, mpp))

    def margin(self, mpp: float) -> int:
        """px that the morphology reaches beyond the pixels it starts from."""
        closing = max(1, round(self.cfg.closing_um / mpp))
        stroke = int(np.ceil(INK_MIN_WIDTH_UM / 2 / mpp)) if self.cfg.exclude_pen else 0
        return max(closing, stroke, 1) + 2

    def window(self, sat: np.ndarray, value: np.ndarray, mpp: float) -> tuple[slice, slice] | None:
        """The part of the image that can hold tissue or ink, with a margin the morphology
        never leaves; None when there is none (all glass). ``sat``, ``value``: the image's
        HSV saturation and value, 0-255.

        Tissue is more saturated than ``min_saturation``; every ink colour, and every
        colour of a stroke's edges, is a chroma of more than ``INK_EDGE_GREEN_OVER_R``
        (a saturation above it on 0-255) or a value under ``INK_EDGE_BLACK_MAX``. Outside
        the window every pixel is glass in the result, so detection there is skipped.
        """
        floor = self.cfg.min_saturation * 255
        if self.cfg.exclude_pen:
            able = (sat > min(floor, INK_EDGE_GREEN_OVER_R)) | (value < INK_EDGE_BLACK_MAX)
        else:
            able = sat > floor
        x, y, w, h = cv2.boundingRect(able.view(np.uint8))
        if w == 0 or h == 0:
            return None
        m = self.margin(mpp)
        rows = slice(max(0, y - m), min(sat.shape[0], y + h + m))
        return rows, slice(max(0, x - m), min(sat.shape[1], x + w + m))

    def detect(
        self,
        thumbnail: np.ndarray,
        sat: np.ndarray,
        value: np.ndarray,
        mpp: float,
        window: tuple[slice, slice] | None,
    ) -> np.ndarray:
        """The tissue mask of ``thumbnail`` (RGB; ``sat`` and ``value`` its HSV saturation
        and value), the pixels outside ``window`` glass (whose histogram still sets the
        thresholds): the same mask as a window of the whole image when the window holds
        every pixel that can be tissue or ink, with :meth:`margin` px around them
        (:meth:`window`)."""
        cfg = self.cfg
        out = np.zeros(sat.shape, bool)
        if window is None:
            return out
        usable_all = value > 38  # value above 0.15: not black
        counts = histogram8(sat, usable_all)  # 256, over the whole image
        rgb, sat = thumbnail[window], sat[window]
        ink = ink_mask(rgb, mpp) if cfg.exclude_pen else np.zeros(sat.shape, bool)
        usable = usable_all[window]
        if ink.any():
            counts -= histogram8(sat, ink & usable)
            usable = usable & ~ink
        if np.count_nonzero(counts) < 2:
            return out
        floor = cfg.min_saturation * 255
        threshold = max(otsu8(counts), floor)
        mask = (sat > threshold) & usable
        if cfg.pale_tissue:
            mask |= pale_tissue_mask(rgb, sat, usable, counts, threshold, floor)

        px_area = mpp * mpp  # um^2 per px
        radius = max(1, round(cfg.closing_um / mpp))
        mask = _morph(mask, cv2.MORPH_CLOSE, radius)
        mask = _fill_holes(mask, max(1, int(cfg.max_hole_um2 / px_area)))
        if ink.any():
            mask &= ~_morph(ink, cv2.MORPH_DILATE, 1)
        out[window] = _remove_small(mask, max(1, int(cfg.min_area_um2 / px_area)))
        return out
