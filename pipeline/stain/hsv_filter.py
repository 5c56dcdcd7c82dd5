"""Virchow's HSV tissue filter, as Midnight applies it to tiles read for pretraining.

Virchow (Vorontsov et al., "A foundation model for clinical-grade computational pathology
and rare cancers detection", Nature Medicine 2024) keeps a tile for training when enough of
its pixels have an H&E colour in HSV; Midnight (Karasikov et al., "Training
state-of-the-art pathology foundation models with orders of magnitude less data", kaiko.ai
2025) uses the same filter on its online patches: a tile is kept when at least 60% of its
pixels have ``H`` in [90, 180], ``S`` in [8, 255] and ``V`` in [103, 255] on OpenCV's
8-bit HSV scale (bounds inclusive, as ``cv2.inRange``). Glass (low S), pen ink and
dark debris (low V) and non-H&E hues (H below 90: red-orange-yellow-green) fail.

The 8-bit scale is OpenCV's ``cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)`` on uint8 images
(OpenCV documentation, "Color conversions", RGB <-> HSV): with R, G, B scaled to 0-1,
``V = max(R, G, B)``, ``S = (V - min) / V`` (0 when V = 0), ``H = 60 (G - B) / (V - min)``
when V = R, ``120 + 60 (B - R) / (V - min)`` when V = G, ``240 + 60 (R - G) / (V - min)``
otherwise, ``H + 360`` when negative, 0 for greys; 8-bit output is ``V <- 255 V``,
``S <- 255 S``, ``H <- H / 2``, so H runs 0-179 (the upper bound 180 of the hue range
admits every hue from 90 up). The documentation gives no rounding rule; OpenCV computes
8-bit HSV in 12-bit fixed point (``RGB2HSV_b`` in ``modules/imgproc/src/color_hsv.simd.hpp``,
the scalar and SIMD paths alike), which :func:`rgb_to_hsv` reproduces exactly:

- ``V = max(r, g, b)`` on the 0-255 values;
- ``S = (diff * round(255 * 2^12 / V) + 2^11) >> 12`` with ``diff = V - min`` (S = 0 when
  V = 0); e.g. (150, 100, 200) gives S = 127, where 127.5 rounded half up would give 128;
- ``H = floor((h' * round(180 * 2^12 / (6 diff)) + 2^11) / 2^12)`` (0 when diff = 0), plus
  180 when negative, with ``h' = g - b`` when V = r, else ``b - r + 2 diff`` when V = g,
  else ``r - g + 4 diff``: R wins ties, then G (yellow (255, 255, 0) has H = 30).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

HSV_SHIFT = 12  # OpenCV's fixed-point shift of 8-bit RGB -> HSV
HUE_RANGE = 180  # 8-bit hue runs 0-179 (degrees / 2)
_HALF = 1 << (HSV_SHIFT - 1)
# OpenCV's tables, round-to-nearest of (255 << 12) / v and (180 << 12) / (6 d); no ties occur
_SDIV = torch.tensor(
    [0] + [round((255 << HSV_SHIFT) / i) for i in range(1, 256)], dtype=torch.int32
)
_HDIV = torch.tensor(
    [0] + [round((HUE_RANGE << HSV_SHIFT) / (6 * i)) for i in range(1, 256)], dtype=torch.int32
)
CHUNK = 32  # tiles converted at a time by the batched functions (bounds temporary memory)


def _as_uint8_tensor(tiles: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    tiles = torch.as_tensor(tiles)
    if tiles.dtype != torch.uint8:
        raise TypeError(f"{what}: RGB uint8 values 0-255 expected, got {tiles.dtype}")
    if tiles.ndim < 3 or tiles.shape[-3] != 3:
        raise ValueError(f"{what}: a ... x 3 x H x W RGB tensor expected, got {tuple(tiles.shape)}")
    return tiles


def rgb_to_hsv(rgb: torch.Tensor | np.ndarray) -> torch.Tensor:
    """OpenCV's 8-bit HSV (``cv2.COLOR_RGB2HSV``) of a ``... x 3 x H x W`` uint8 RGB tensor.

    Returns ``... x 3 x H x W`` uint8: H in 0-179 (degrees / 2), S and V in 0-255,
    bit-exact with OpenCV's fixed-point conversion (module docstring).
    """
    rgb = _as_uint8_tensor(rgb, "rgb_to_hsv")
    x = rgb.to(torch.int32)  # ... x 3 x H x W
    r, g, b = x.unbind(-3)  # each ... x H x W
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    sdiv, hdiv = _SDIV.to(rgb.device), _HDIV.to(rgb.device)
    s = (diff * sdiv[v.long()] + _HALF) >> HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = torch.div(h * hdiv[diff.long()] + _HALF, 1 << HSV_SHIFT, rounding_mode="floor")
    h = torch.where(h < 0, h + HUE_RANGE, h)
    return torch.stack([h, s, v], dim=-3).to(torch.uint8)  # ... x 3 x H x W


def hsv_in_range(
    rgb: torch.Tensor | np.ndarray,
    hue: tuple[int, int] = (90, 180),
    saturation: tuple[int, int] = (8, 255),
    value: tuple[int, int] = (103, 255),
) -> torch.Tensor:
    """Pixels of a ``... x 3 x H x W`` uint8 RGB tensor whose 8-bit HSV lies in the ranges
    (bounds inclusive, as ``cv2.inRange``): a ``... x H x W`` bool tensor."""
    hsv = rgb_to_hsv(rgb).to(torch.int16)  # ... x 3 x H x W
    h, s, v = hsv.unbind(-3)
    return (
        (h >= hue[0])
        & (h <= hue[1])
        & (s >= saturation[0])
        & (s <= saturation[1])
        & (v >= value[0])
        & (v <= value[1])
    )


def hsv_shares(
    tiles: torch.Tensor | np.ndarray,
    hue: tuple[int, int] = (90, 180),
    saturation: tuple[int, int] = (8, 255),
    value: tuple[int, int] = (103, 255),
) -> torch.Tensor:
    """Share of in-range pixels of each tile of a ``B x 3 x H x W`` uint8 batch: ``B``
    float64 (exact count / pixels, so 60 of 100 pixels is exactly 0.6)."""
    tiles = _as_uint8_tensor(tiles, "hsv_shares")
    if tiles.ndim != 4:
        raise ValueError(f"hsv_shares: a B x 3 x H x W batch expected, got {tuple(tiles.shape)}")
    pixels = tiles.shape[-2] * tiles.shape[-1]
    counts = [
        hsv_in_range(chunk, hue, saturation, value).sum(dim=(-2, -1))  # chunk
        for chunk in tiles.split(CHUNK)
    ]
    if not counts:
        return torch.zeros(0, dtype=torch.float64, device=tiles.device)
    return torch.cat(counts).to(torch.float64) / max(pixels, 1)  # B


def hsv_share(
    tile: torch.Tensor | np.ndarray,
    hue: tuple[int, int] = (90, 180),
    saturation: tuple[int, int] = (8, 255),
    value: tuple[int, int] = (103, 255),
) -> float:
    """Share of in-range pixels of one ``3 x H x W`` uint8 RGB tile (0-1)."""
    tile = _as_uint8_tensor(tile, "hsv_share")
    if tile.ndim != 3:
        raise ValueError(f"hsv_share: a 3 x H x W tile expected, got {tuple(tile.shape)}")
    return float(hsv_shares(tile[None], hue, saturation, value)[0])


@dataclass(frozen=True)
class HSVFilter:
    """Virchow's HSV tissue filter (Vorontsov et al. 2024) with Midnight's 60% share
    (Karasikov et al. 2025): keep a tile when at least ``min_share`` of its pixels have
    8-bit OpenCV HSV inside ``hue`` x ``saturation`` x ``value`` (inclusive bounds).

    >>> HSVFilter().keep(tile)  # tile: 3 x H x W uint8 RGB
    """

    hue: tuple[int, int] = (90, 180)
    saturation: tuple[int, int] = (8, 255)
    value: tuple[int, int] = (103, 255)
    min_share: float = 0.6

    def __post_init__(self) -> None:
        for name, (low, high), top in (
            ("hue", self.hue, HUE_RANGE),
            ("saturation", self.saturation, 255),
            ("value", self.value, 255),
        ):
            if not 0 <= low <= high <= top:
                raise ValueError(
                    f"HSVFilter: {name} range ({low}, {high}) is not within 0-{top}, OpenCV's "
                    "8-bit scale (hue is degrees / 2, 0-179)"
                )
        if not 0.0 <= self.min_share <= 1.0:
            raise ValueError(f"HSVFilter: min_share must be in [0, 1], got {self.min_share}")

    def share(self, tile: torch.Tensor | np.ndarray) -> float:
        """Share of in-range pixels of a ``3 x H x W`` uint8 tile."""
        return hsv_share(tile, self.hue, self.saturation, self.value)

    def shares(self, tiles: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Shares of a ``B x 3 x H x W`` uint8 batch (``B`` float64)."""
        return hsv_shares(tiles, self.hue, self.saturation, self.value)

    def keep(self, tile: torch.Tensor | np.ndarray) -> bool:
        """Whether a ``3 x H x W`` uint8 tile passes (share >= ``min_share``)."""
        return self.share(tile) >= self.min_share

    def keep_batch(self, tiles: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Which tiles of a ``B x 3 x H x W`` uint8 batch pass: ``B`` bool."""
        return self.shares(tiles) >= self.min_share
