"""Tissue detection on a low-resolution image of the slide (about 8 um per px).

Detectors share one small interface: a callable taking an RGB uint8 thumbnail and its
resolution (um per px) and returning a boolean tissue mask of the same height and
width. They register by name in :data:`TISSUE_METHODS`; a learned segmenter is one more
class with ``@register_tissue_method("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import disk, remove_small_holes, remove_small_objects

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
        mpp: resolution of the image tissue is detected on, um per px (8-16 is typical).
        min_area_um2: connected pieces smaller than this are debris and dropped.
        max_hole_um2: holes inside tissue smaller than this are filled.
        closing_um: radius of the morphological closing that joins nearby fragments.
        min_saturation: lowest accepted Otsu threshold on HSV saturation (0-1).
        exclude_pen: remove blue, green and black ink and grey-black artefacts.
    """

    method: str = "hsv_otsu"
    mpp: float = 8.0
    min_area_um2: float = 5000.0
    max_hole_um2: float = 50000.0
    closing_um: float = 16.0
    min_saturation: float = 0.05
    exclude_pen: bool = True


def make_tissue_detector(cfg: TissueConfig) -> TissueDetector:
    """Instantiate the detector named by ``cfg.method``."""
    if cfg.method not in TISSUE_METHODS:
        known = ", ".join(sorted(TISSUE_METHODS))
        raise ValueError(f"unknown tissue method '{cfg.method}'; known: {known}")
    return TISSUE_METHODS[cfg.method](cfg)


def to_hsv(rgb: np.ndarray) -> np.ndarray:
    """HSV of an RGB uint8 image as float32 in [0, 1] (Pillow's C conversion: fast on big thumbnails)."""
    hsv = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).convert("HSV"))
    return hsv.astype(np.float32) * np.float32(1 / 255)


def ink_mask(hsv: np.ndarray) -> np.ndarray:
    """Pen ink and dark artefacts: blue and green marker, black marker, grey-black debris.

    H&E is pink to purple (hue ~0.75-1.0 and ~0-0.05); blue ink sits at hue ~0.55-0.70 and
    green at ~0.2-0.5, both strongly saturated; black ink and folds are dark and grey.
    """
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    blue = (h > 0.55) & (h < 0.70) & (s > 0.30)
    green = (h > 0.20) & (h < 0.50) & (s > 0.20)
    black = (v < 0.30) & (s < 0.45)
    return blue | green | black


@register_tissue_method("hsv_otsu")
class HSVOtsu:
    """Otsu threshold on HSV saturation with morphology and ink exclusion (as in CLAM).

    Saturation separates stained tissue from glass; Otsu's threshold adapts to each
    slide's stain strength. Closing joins fragments, small holes are filled and pieces
    below ``min_area_um2`` dropped; pen ink is removed before and after.
    """

    def __init__(self, cfg: TissueConfig):
        self.cfg = cfg

    def __call__(self, thumbnail: np.ndarray, mpp: float) -> np.ndarray:
        cfg = self.cfg
        hsv = to_hsv(thumbnail)  # H x W x 3 in [0, 1]
        sat = hsv[..., 1]
        ink = ink_mask(hsv) if cfg.exclude_pen else np.zeros(sat.shape, bool)
        usable = ~ink & (hsv[..., 2] > 0.15)
        values = sat[usable]
        if values.size == 0 or values.max() - values.min() < 1e-3:
            return np.zeros(sat.shape, bool)
        threshold = max(float(threshold_otsu(values)), cfg.min_saturation)
        mask = (sat > threshold) & usable

        px_area = mpp * mpp  # um^2 per px
        radius = max(1, round(cfg.closing_um / mpp))
        mask = ndimage.binary_closing(mask, structure=disk(radius), border_value=0)
        mask = remove_small_holes(mask, max_size=max(1, int(cfg.max_hole_um2 / px_area)))
        if cfg.exclude_pen:
            mask &= ~ndimage.binary_dilation(ink, structure=disk(1))
        return remove_small_objects(mask, max_size=max(1, int(cfg.min_area_um2 / px_area)))
