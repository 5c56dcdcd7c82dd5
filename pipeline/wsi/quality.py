"""Tile quality filters: white, black and grey shares on the detection image, blur on a read.

White, black and grey are pixel classes of the image tissue is detected on (the pyramid
level near 16 um per px, already in memory): each tile's share of a class is the share
of its level-0 box the class covers (:func:`pipeline.wsi.tiling.box_shares`), so they
cost one pass over that image. Blur is the variance of the Laplacian of the tile's grey
levels, which needs the tile at a resolution where focus shows (``blur_mpp``): each kept
tile is read once more, so it is off unless asked for. All filters are off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.wsi.tiling import box_shares

QUALITY_COUNTS = ("n_white", "n_black", "n_grey", "n_blurry")


@dataclass
class QualityConfig:
    """Tile quality filters (all off by default; a tile failing any is dropped).

    The defaults of the levels follow common practice (hs2p's: white above 220, black
    under 25, grey under saturation 0.05).

    Args:
        white_max: drop tiles more than this share white (every channel above white_level); 1 keeps all.
        white_level: an 8-bit level every channel of a white pixel exceeds.
        black_max: drop tiles more than this share black (every channel below black_level); 1 keeps all.
        black_level: an 8-bit level every channel of a black pixel is under.
        grey_max: drop tiles more than this share grey (HSV saturation under grey_saturation, neither white nor black: out-of-focus smear, dust, uncoloured debris); 1 keeps all.
        grey_saturation: HSV saturation (0-1) under which a pixel is grey.
        blur_min: drop tiles whose Laplacian variance (8-bit grey levels squared, at blur_mpp) is under this; 0 keeps all (and reads nothing more).
        blur_mpp: resolution (um per px) tiles are read at for the blur score.
    """

    white_max: float = 1.0
    white_level: int = 220
    black_max: float = 1.0
    black_level: int = 25
    grey_max: float = 1.0
    grey_saturation: float = 0.05
    blur_min: float = 0.0
    blur_mpp: float = 1.0

    def validate(self) -> list[str]:
        """What is wrong with the settings (empty when nothing)."""
        errors = [
            f"--quality.{name} must be in [0, 1], got {getattr(self, name)}"
            for name in ("white_max", "black_max", "grey_max", "grey_saturation")
            if not 0.0 <= getattr(self, name) <= 1.0
        ]
        errors += [
            f"--quality.{name} must be an 8-bit level (0-255), got {getattr(self, name)}"
            for name in ("white_level", "black_level")
            if not 0 <= getattr(self, name) <= 255
        ]
        if self.blur_min < 0 or self.blur_mpp <= 0:
            errors.append("--quality.blur_min must be >= 0 and --quality.blur_mpp > 0")
        return errors


def pixel_classes(image: np.ndarray, hsv: np.ndarray, cfg: QualityConfig) -> dict[str, np.ndarray]:
    """White, black and grey pixels of an RGB uint8 ``image`` (``hsv``: its 8-bit HSV)."""
    white = (image > cfg.white_level).all(axis=-1)
    black = (image < cfg.black_level).all(axis=-1)
    grey = (hsv[..., 1] < cfg.grey_saturation * 255) & ~white & ~black
    return {"white": white, "black": black, "grey": grey}


def blur_score(tile: np.ndarray) -> float:
    """Variance of the Laplacian of an RGB uint8 tile's grey levels (higher: sharper)."""
    grey = tile.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # H x W
    return float(ndimage.laplace(grey)[1:-1, 1:-1].var())


def quality_keep(
    cfg: QualityConfig,
    image: np.ndarray,
    hsv: np.ndarray,
    level0_size: tuple[int, int],
    coords: np.ndarray,
    size0: int,
    read_tile=None,
) -> tuple[np.ndarray, dict[str, int]]:
    """Which tiles (``N x 2`` level-0 corners, ``size0`` px boxes) pass the filters, on the
    detection ``image`` (RGB uint8 spanning the slide) and its ``hsv``; and how many fail
    each (a tile failing several counts in each). ``read_tile(location, size0)``: the
    tile's RGB at ``cfg.blur_mpp``, needed only when ``cfg.blur_min > 0``; blur is
    scored on the tiles the other filters keep."""
    keep = np.ones(len(coords), bool)
    counts = dict.fromkeys(QUALITY_COUNTS, 0)
    limits = {"white": cfg.white_max, "black": cfg.black_max, "grey": cfg.grey_max}
    if any(v < 1.0 for v in limits.values()):
        for name, mask in pixel_classes(image, hsv, cfg).items():
            if limits[name] < 1.0:
                bad = box_shares(mask, level0_size, coords, size0) > limits[name]
                counts[f"n_{name}"] = int(bad.sum())
                keep &= ~bad
    if cfg.blur_min > 0:  # only the tiles the other filters keep are read
        if read_tile is None:
            raise ValueError("the blur filter needs read_tile")
        todo = np.flatnonzero(keep)
        scores = [blur_score(read_tile((int(x), int(y)), size0)) for x, y in coords[todo]]
        bad = todo[np.asarray(scores) < cfg.blur_min]
        counts["n_blurry"] = len(bad)
        keep[bad] = False
    return keep, counts


def any_active(cfg: QualityConfig) -> bool:
    """Whether any filter is on."""
    return min(cfg.white_max, cfg.black_max, cfg.grey_max) < 1.0 or cfg.blur_min > 0
