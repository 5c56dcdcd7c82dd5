"""Write pyramidal, tiled, JPEG-compressed TIFFs that OpenSlide opens as Aperio slides.

Layout follows the Aperio SVS convention that OpenSlide's ``aperio`` driver expects:
page 0 is the tiled full-resolution level whose ImageDescription starts with
``Aperio`` and carries ``|AppMag = ..|MPP = ..``; page 1 is a stripped thumbnail;
the following tiled pages are the reduced levels (``subfiletype=1``), each 4x smaller.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from pipeline.io import atomic_path


def downsample_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter downsample of an ``H x W x 3`` uint8 image by an integer ``factor``.

    Edge blocks that are not whole are averaged over the pixels that exist.
    """
    return np.asarray(Image.fromarray(image).reduce(factor))


def pyramid_shapes(height: int, width: int, min_level_size: int = 256) -> list[tuple[int, int]]:
    """``(height, width)`` of each level: 4x reductions while the shorter side stays >= min."""
    shapes = [(height, width)]
    while min(shapes[-1]) // 4 >= min_level_size:
        h, w = shapes[-1]
        shapes.append((-(-h // 4), -(-w // 4)))
    return shapes


def aperio_description(
    width: int, height: int, mpp: float, magnification: float, tile: int, extra: dict | None = None
) -> str:
    """ImageDescription of an Aperio level-0 page (``Aperio Image Library ...|AppMag|MPP``)."""
    fields = {"AppMag": f"{magnification:g}", "MPP": f"{mpp:.4f}", **(extra or {})}
    head = (
        f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] "
        f"({tile}x{tile}) JPEG/RGB Q=90"
    )
    return head + "".join(f"|{k} = {v}" for k, v in fields.items())


def write_aperio_tiff(
    path: str | os.PathLike,
    image: np.ndarray,
    mpp: float,
    magnification: float,
    *,
    tile: int = 256,
    quality: int = 90,
    min_level_size: int = 256,
    thumbnail_size: int = 768,
    extra: dict | None = None,
) -> Path:
    """Write ``image`` (``H x W x 3`` uint8, level 0 at ``mpp`` um/px) as an Aperio-style TIFF.

    Reduced levels are 4x box-filtered copies, added while their shorter side stays
    at least ``min_level_size`` px. The file is written under a temporary name and
    renamed, so a killed run never leaves a truncated slide behind.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 image, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    res = (1e4 / mpp, 1e4 / mpp)  # px per cm
    jpeg = {"compression": "jpeg", "compressionargs": {"level": quality}}
    common = {
        "photometric": "rgb",
        "resolution": res,
        "resolutionunit": "CENTIMETER",
        "metadata": None,  # no second (JSON) ImageDescription: OpenSlide reads the first
    }

    levels = [image]
    for _ in pyramid_shapes(h, w, min_level_size)[1:]:
        levels.append(downsample_mean(levels[-1], 4))
    source = next((lv for lv in reversed(levels) if max(lv.shape[:2]) >= thumbnail_size), image)
    thumb = downsample_mean(source, max(1, round(max(source.shape[:2]) / thumbnail_size)))

    path = Path(path)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=h * w * 3 > 2**31) as tif:
        desc = aperio_description(w, h, mpp, magnification, tile, extra)
        tif.write(image, tile=(tile, tile), description=desc, **jpeg, **common)
        tif.write(
            thumb,
            rowsperstrip=16,
            description=f"Aperio Image Library v12.0.15 \r\n"
            f"{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - ",
            **jpeg,
            **common,
        )
        for level in levels[1:]:
            lh, lw = level.shape[:2]
            tif.write(
                level,
                tile=(tile, tile),
                subfiletype=1,
                description=f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> {lw}x{lh} - ",
                **jpeg,
                **{**common, "resolution": (res[0] * lw / w, res[1] * lh / h)},
            )
    return path
