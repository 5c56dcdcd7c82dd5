"""Open any whole-slide image and read regions at a physical resolution (um per px, "mpp").

OpenSlide reads every format it knows (Aperio, Hamamatsu, Leica, MIRAX, Philips,
Sakura, Ventana, Zeiss, DICOM, generic tiled TIFF). Other images (non-tiled TIFF,
PNG, JPEG) up to ``MAX_PLAIN_PIXELS`` are read whole through tifffile or Pillow as a
one-level slide; larger ones are refused with a request to convert them. A whole
pyramid level of a slide whose levels are the file's tiled TIFF pages (Aperio, generic
tiled TIFF) is decoded by tifffile (:meth:`Slide.read_level`): the same pixels as
OpenSlide's, several times faster.

The level-0 mpp is a value given by the user (``--level0-mpp`` or a CSV column; source
``override``) when there is one: it overrides the metadata, so that a slide whose
metadata is wrong can be corrected. Otherwise it is resolved from the metadata by a
chain, and its source is recorded:

1. ``openslide``: the vendor's own metadata, as OpenSlide reports ``openslide.mpp-x``
   (source ``aperio-mpp`` when it comes from an Aperio ``MPP`` field, ``tiff-resolution``
   for generic TIFFs, else ``openslide-<vendor>``);
2. ``tiff-resolution``: the TIFF XResolution/YResolution tags (unit cm or inch);
3. ``aperio-mpp``: the ``|MPP = ..`` field of an Aperio ImageDescription;
4. ``objective-power``: the objective magnification (40x -> 0.25, 20x -> 0.5 mpp).

Coordinates are always level-0 pixels; sizes say at which mpp they are.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.errors import SlideError

log = logging.getLogger(__name__)

MPP_RANGE = (0.05, 50.0)  # plausible level-0 resolutions; outside is metadata junk
MPP_TOLERANCE = 0.02  # relative difference of resolutions read as equal (scanner calibration)
MPP_OVERRIDE_WARNING = 0.05  # a given mpp this far from the metadata's is logged as a warning

try:  # OpenSlide's C read into our own buffer (openslide-python's ctypes binding)
    from ctypes import POINTER, c_uint32

    from openslide.lowlevel import _read_region as _RAW_READ

    _U32_POINTER = POINTER(c_uint32)
    if sys.byteorder != "little":
        _RAW_READ = None
except ImportError:  # another openslide-python: use its public read_region
    _RAW_READ = None
PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
# OpenSlide formats whose pyramid levels are the file's tiled TIFF pages, in order, and the
# tile codecs whose decoding by tifffile (imagecodecs) gives OpenSlide's pixels: lossless
# ones, and JPEG (RGB and YCbCr) and Aperio's RGB JPEG 2000, tested on real slides. Aperio's
# YCbCr JPEG 2000, whose colour conversion OpenSlide does itself, is left to OpenSlide.
TIFF_LEVEL_VENDORS = ("aperio", "generic-tiff")
TIFF_LEVEL_CODECS = ("NONE", "LZW", "ADOBE_DEFLATE", "DEFLATE", "JPEG", "APERIO_JP2000_RGB")
Image.MAX_IMAGE_PIXELS = None  # plain images are slides too; _PlainImage checks the size
MAX_PLAIN_PIXELS = 16384 * 16384  # larger non-tiled images are refused: read whole (~0.8 GB RGB)


def _check_plain_size(path: Path, width: int, height: int) -> None:
    """Refuse a non-tiled image too big to hold in memory, saying how to convert it."""
    if width * height > MAX_PLAIN_PIXELS:
        raise SlideError(
            f"{path}: a {width} x {height} px image that is not tiled, so it would be read "
            f"whole (about {width * height * 3 / 1e9:.1f} GB; the limit is "
            f"{MAX_PLAIN_PIXELS / 1e6:.0f} Mpx). Convert it to a tiled pyramidal TIFF, e.g. "
            f"`vips tiffsave {path.name} slide.tif --tile --pyramid --compression jpeg "
            "--tile-width 256 --tile-height 256 --xres PX_PER_MM --yres PX_PER_MM` or "
            "pipeline.wsi.writer.write_aperio_tiff, and give that file instead."
        )


@dataclass(frozen=True)
class Resolution:
    """Level-0 microns per pixel and where the value came from."""

    mpp_x: float
    mpp_y: float
    source: str

    @property
    def mpp(self) -> float:
        return (self.mpp_x + self.mpp_y) / 2


def _plausible(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and MPP_RANGE[0] <= value <= MPP_RANGE[1]


def _float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def mpp_from_tiff_tags(x_res: float | None, y_res: float | None, unit: str | None) -> float | None:
    """Level-0 mpp from TIFF resolution tags (pixels per ``unit``), or None."""
    per_um = {"centimeter": 1e-4, "inch": 1 / 25400.0}.get((unit or "").lower())
    if per_um is None or not x_res:
        return None
    mpp = 1.0 / (x_res * per_um)
    return mpp if _plausible(mpp) else None


def resolve_mpp(properties: dict[str, str], override: float | None = None) -> Resolution | None:
    """The level-0 resolution: ``override`` (a user's value) when given, else the metadata's.

    Raises ``ValueError`` for an override outside :data:`MPP_RANGE`.
    """
    if override is not None:
        if not _plausible(override):
            raise ValueError(
                f"level-0 mpp {override} is outside {MPP_RANGE[0]}-{MPP_RANGE[1]} um per px"
            )
        return Resolution(float(override), float(override), "override")
    return metadata_mpp(properties)


def metadata_mpp(properties: dict[str, str]) -> Resolution | None:
    """Apply the mpp chain (module docstring) to OpenSlide-style ``properties``."""
    vendor = properties.get("openslide.vendor", "")
    mx, my = _float(properties.get("openslide.mpp-x")), _float(properties.get("openslide.mpp-y"))
    if _plausible(mx):
        my = my if _plausible(my) else mx
        if vendor == "aperio" and "aperio.MPP" in properties:
            source = "aperio-mpp"
        elif vendor == "generic-tiff":
            source = "tiff-resolution"
        else:
            source = f"openslide-{vendor or 'unknown'}"
        return Resolution(mx, my, source)

    unit = properties.get("tiff.ResolutionUnit")
    rx = mpp_from_tiff_tags(_float(properties.get("tiff.XResolution")), None, unit)
    ry = mpp_from_tiff_tags(_float(properties.get("tiff.YResolution")), None, unit)
    if rx is not None:
        return Resolution(rx, ry or rx, "tiff-resolution")

    description = properties.get("tiff.ImageDescription", "")
    if description.startswith("Aperio"):
        match = re.search(r"\|\s*MPP\s*=\s*([0-9.]+)", description)
        if match and _plausible(_float(match.group(1))):
            value = float(match.group(1))
            return Resolution(value, value, "aperio-mpp")
        match = re.search(r"\|\s*AppMag\s*=\s*([0-9.]+)", description)
        if match:
            properties = {**properties, "openslide.objective-power": match.group(1)}

    power = _float(properties.get("openslide.objective-power") or properties.get("aperio.AppMag"))
    if power and _plausible(10.0 / power):
        return Resolution(10.0 / power, 10.0 / power, "objective-power")
    return None


class _PlainImage:
    """A whole image in memory, shaped like a one-level OpenSlide object."""

    def __init__(self, path: Path):
        self.properties: dict[str, str] = {"openslide.vendor": "plain-image"}
        if path.suffix.lower() in {".tif", ".tiff"}:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                _check_plain_size(path, page.imagewidth, page.imagelength)
                array = page.asarray()
                tags = page.tags
                if "XResolution" in tags and "ResolutionUnit" in tags:
                    num, den = tags["XResolution"].value
                    unit = tags["ResolutionUnit"].value
                    name = {2: "inch", 3: "centimeter"}.get(int(unit), "none")
                    self.properties.update(
                        {"tiff.XResolution": str(num / den), "tiff.ResolutionUnit": name}
                    )
                    if "YResolution" in tags:
                        num, den = tags["YResolution"].value
                        self.properties["tiff.YResolution"] = str(num / den)
                if "ImageDescription" in tags:
                    self.properties["tiff.ImageDescription"] = str(tags["ImageDescription"].value)
        else:
            with Image.open(path) as img:
                _check_plain_size(path, *img.size)
                array = np.asarray(img.convert("RGB"))
        array = _to_rgb(array, path)
        self._image = Image.fromarray(array)
        self.level_count = 1
        self.level_dimensions = ((array.shape[1], array.shape[0]),)
        self.level_downsamples = (1.0,)
        self.dimensions = self.level_dimensions[0]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image:
        """RGBA like OpenSlide's: pixels outside the image are transparent (white once read)."""
        x, y = location
        w, h = self.dimensions
        region = Image.new("RGBA", size, (255, 255, 255, 0))
        box = (max(x, 0), max(y, 0), min(x + size[0], w), min(y + size[1], h))
        if box[0] < box[2] and box[1] < box[3]:
            region.paste(self._image.crop(box), (box[0] - x, box[1] - y))
        return region

    def close(self) -> None:
        self._image = None


def resample(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of an ``h x w x C`` uint8 image to ``size`` (w, h).

    Uses torch's uint8 kernels, fastest on 4-channel channels-last data (RGBA tiles).
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(image).permute(2, 0, 1)[None]  # 1 x C x h x w, channels-last
    y = F.interpolate(x, size=(size[1], size[0]), mode="bilinear", antialias=True)
    return y[0].permute(1, 2, 0).numpy()  # h x w x C


def _looks_like_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _to_rgb(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise SlideError(f"{path}: image of shape {array.shape} is not RGB; convert it to RGB.")
    if array.dtype != np.uint8:
        top = float(array.max()) or 1.0
        array = (array.astype(np.float32) * (255.0 / top)).astype(np.uint8)
    return np.ascontiguousarray(array[..., :3])


class Slide:
    """A whole-slide image with its level-0 resolution.

    ``level0_mpp``, when given, is the slide's level-0 um per px and overrides its
    metadata (:attr:`metadata_resolution` keeps what the metadata says).

    >>> with Slide("x.svs") as s:
    ...     tile = s.read_at_mpp((1024, 2048), 256, 0.5)  # 256 x 256 RGB at 0.5 um/px
    """

    def __init__(self, path: str | os.PathLike, level0_mpp: float | None = None):
        self.path = Path(path)
        if self.path.is_dir():  # a DICOM whole-slide set: OpenSlide opens it from any file
            series = sorted(self.path.glob("*.dcm"))
            if not series:
                raise SlideError(
                    f"{self.path}: a folder, not a slide; a folder is one slide only when it "
                    "holds a DICOM series (*.dcm)."
                )
            self.path = series[0]
        if not self.path.is_file():
            raise SlideError(f"{self.path}: no such file; check the path or the slide list.")
        if self.path.stat().st_size == 0:
            raise SlideError(f"{self.path}: the file is empty (0 bytes); copy the slide again.")
        self._handle = self._open()
        self._tiff = None  # tifffile's view of the file, opened by read_level when useful
        self.properties = dict(self._handle.properties)
        self.vendor = self.properties.get("openslide.vendor", "unknown")
        self.level_count = self._handle.level_count
        self.level_dimensions = tuple(tuple(d) for d in self._handle.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._handle.level_downsamples)
        self.dimensions = self.level_dimensions[0]
        self.metadata_resolution = metadata_mpp(self.properties)
        try:
            self.resolution = resolve_mpp(self.properties, level0_mpp)
        except ValueError as exc:
            self.close()
            raise SlideError(
                f"{self.path}: the given {exc}; check --level0-mpp or the "
                "slide list's 'mpp' column."
            ) from None

    def _open(self):
        import openslide

        try:
            return openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            if _looks_like_tiff(self.path) and self.path.suffix.lower() not in {".tif", ".tiff"}:
                raise SlideError(
                    f"{self.path}: a TIFF-based slide that OpenSlide cannot read; the file is "
                    "probably truncated or corrupt: copy it again from the scanner or archive."
                ) from None
            if self.path.suffix.lower() not in PLAIN_IMAGE_SUFFIXES:
                raise SlideError(
                    f"{self.path}: not a slide format OpenSlide knows, nor a TIFF/PNG/JPEG "
                    "image; check that the file is a whole-slide image."
                ) from None
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"{self.path}: OpenSlide cannot read it ({exc}); the file may be truncated "
                "or corrupt: copy it again from the scanner or archive."
            ) from exc
        try:
            return _PlainImage(self.path)
        except SlideError:
            raise
        except Exception as exc:  # tifffile/Pillow raise many types for broken files
            raise SlideError(
                f"{self.path}: cannot be read as an image ({type(exc).__name__}: {exc}); "
                "the file may be truncated or not an image."
            ) from exc

    # -- resolution ---------------------------------------------------------------
    @property
    def mpp(self) -> float:
        """Level-0 um per px; raises a :class:`SlideError` saying how to supply it."""
        if self.resolution is None:
            raise SlideError(
                f"{self.path}: no resolution (mpp) in the file's metadata (no OpenSlide mpp, "
                "TIFF resolution tags, Aperio MPP or objective power). Give it with an 'mpp' "
                "column in the slide list CSV, or --level0-mpp (for every slide of the run)."
            )
        return self.resolution.mpp

    @property
    def mpp_source(self) -> str | None:
        return None if self.resolution is None else self.resolution.source

    def override_warning(self) -> str | None:
        """A message when a given level-0 mpp departs from the metadata's by more than
        :data:`MPP_OVERRIDE_WARNING`, else None."""
        given, meta = self.resolution, self.metadata_resolution
        if given is None or given.source != "override" or meta is None:
            return None
        change = given.mpp / meta.mpp - 1
        if abs(change) <= MPP_OVERRIDE_WARNING:
            return None
        return (
            f"{self.path}: the given level-0 mpp {given.mpp:g} overrides {meta.mpp:g} from "
            f"the slide's metadata ({meta.source}), {change:+.0%} apart; {given.mpp:g} is used"
        )

    def best_level(self, downsample: float) -> int:
        """Coarsest level whose downsample does not exceed ``downsample`` (1% tolerance)."""
        fits = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.01]
        return max(fits, key=lambda i: self.level_downsamples[i]) if fits else 0

    # -- reading -----------------------------------------------------------------
    def _read_bgra(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """``h x w x 4`` uint8 in B, G, R, A order, composited over white (alpha 255).

        OpenSlide slides are read straight into a numpy buffer (premultiplied ARGB words,
        i.e. B, G, R, A bytes on little-endian machines), skipping Pillow's conversions;
        other handles go through their ``read_region``.
        """
        x, y = location
        w, h = size
        try:
            if _RAW_READ and hasattr(self._handle, "_osr"):
                words = np.empty((h, w), np.uint32)
                _RAW_READ(self._handle._osr, words.ctypes.data_as(_U32_POINTER), x, y, level, w, h)
                bgra = words.view(np.uint8).reshape(h, w, 4)
                if words.min() >= 0xFF000000:  # every alpha byte is 255: nothing to composite
                    return bgra
                premultiplied = True
            else:
                rgba = np.array(self._handle.read_region(location, level, size))  # h x w x 4
                bgra = rgba[..., [2, 1, 0, 3]]
                premultiplied = False
        except Exception as exc:  # OpenSlideError and friends after a bad tile
            raise SlideError(
                f"{self.path}: reading {size} px at {location} (level {level}) failed "
                f"({exc}); the file may be truncated or corrupt."
            ) from exc
        alpha = bgra[..., 3]
        if alpha.min() < 255:  # transparent (unscanned) areas become white glass
            a = alpha[..., None].astype(np.uint16)
            color = bgra[..., :3].astype(np.uint16)
            if not premultiplied:
                color = color * a // 255
            bgra[..., :3] = (color + (255 - a)).clip(0, 255)
            bgra[..., 3] = 255
        return bgra

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """``size`` (w, h) px of ``level`` at level-0 ``location`` as RGB uint8 (h x w x 3).

        Transparent pixels (outside the scanned area) come back white.
        """
        return cv2.cvtColor(self._read_bgra(location, level, size), cv2.COLOR_BGRA2RGB)

    def _tile_bgra(
        self, location: tuple[int, int], size_level0: tuple[int, int], size: tuple[int, int]
    ) -> np.ndarray:
        (w0, h0), (w, h) = size_level0, size
        level = self.best_level(min(w0 / w, h0 / h))
        ds = self.level_downsamples[level]
        lw, lh = max(1, round(w0 / ds)), max(1, round(h0 / ds))
        if abs(lw / w - 1) <= MPP_TOLERANCE and abs(lh / h - 1) <= MPP_TOLERANCE:
            return self._read_bgra(location, level, (w, h))
        return resample(self._read_bgra(location, level, (lw, lh)), (w, h))

    def read_tile(
        self, location: tuple[int, int], size_level0: tuple[int, int], size: tuple[int, int]
    ) -> np.ndarray:
        """The level-0 box ``location`` + ``size_level0`` resampled to ``size`` (w, h) px, RGB h x w x 3.

        Reads the coarsest pyramid level that still has at least ``size`` px over the box
        and resamples only the rest (never level 0 when a coarser level serves), with
        antialiased bilinear interpolation. A level within ``MPP_TOLERANCE`` of the
        wanted scale (e.g. 0.499 or 0.502 mpp for 0.5) is read 1:1 without resampling.
        """
        return cv2.cvtColor(self._tile_bgra(location, size_level0, size), cv2.COLOR_BGRA2RGB)

    def read_tile_chw(
        self, location: tuple[int, int], size_level0: tuple[int, int], size: tuple[int, int]
    ) -> np.ndarray:
        """:meth:`read_tile` as a contiguous ``3 x h x w`` array, the layout tensors want."""
        bgra = self._tile_bgra(location, size_level0, size)
        return np.ascontiguousarray(bgra[..., [2, 1, 0]].transpose(2, 0, 1))  # planar already

    def read_at_mpp(
        self, location: tuple[int, int], size: int | tuple[int, int], mpp: float
    ) -> np.ndarray:
        """``size`` (w, h) px at ``mpp`` um/px with its top-left at level-0 ``location``."""
        w, h = (size, size) if isinstance(size, int) else size
        scale = mpp / self.mpp  # level-0 px per output px
        return self.read_tile(location, (round(w * scale), round(h * scale)), (w, h))

    def thumbnail_at_mpp(self, mpp: float, chunk: int = 4096) -> np.ndarray:
        """The whole slide at about ``mpp`` um/px (RGB uint8), read in chunks.

        Peak memory is set by the output plus one ``chunk`` x ``chunk`` read, not by the
        slide: a 100k x 100k px slide is never read whole.
        """
        scale = mpp / self.mpp
        level = self.best_level(scale)
        return self._read_level_scaled(level, scale / self.level_downsamples[level], chunk)

    def _read_level_scaled(self, level: int, factor: float, chunk: int = 4096) -> np.ndarray:
        """Pyramid ``level`` shrunk by ``factor`` (>= ~1, level px per output px), read
        in ``chunk`` x ``chunk`` regions and box-filtered."""
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        out_w, out_h = max(1, round(lw / factor)), max(1, round(lh / factor))
        step = max(1, int(chunk / factor))  # output px per chunk side
        out = None if step >= max(out_w, out_h) else np.empty((out_h, out_w, 3), np.uint8)
        for oy in range(0, out_h, step):
            for ox in range(0, out_w, step):
                cw, ch = min(step, out_w - ox), min(step, out_h - oy)
                x0, y0 = int(ox * factor), int(oy * factor)
                x1 = min(lw, max(x0 + 1, round((ox + cw) * factor)))
                y1 = min(lh, max(y0 + 1, round((oy + ch) * factor)))
                region = self.read_region(
                    (round(x0 * ds), round(y0 * ds)), level, (x1 - x0, y1 - y0)
                )
                if region.shape[:2] != (ch, cw):
                    img = Image.fromarray(region).resize((cw, ch), Image.Resampling.BOX)
                    region = np.asarray(img)
                if out is None:  # one chunk: the read is the image
                    return region
                out[oy : oy + ch, ox : ox + cw] = region
        return out

    def _level_page(self, level: int):
        """The tiled TIFF page that holds pyramid ``level`` as OpenSlide reads it, when
        tifffile decodes it to the same pixels: a slide whose levels are its tiled pages
        (:data:`TIFF_LEVEL_VENDORS`), 8-bit RGB, a codec of :data:`TIFF_LEVEL_CODECS` and
        no missing tile (OpenSlide shows those as transparent). Else None."""
        if not hasattr(self._handle, "_osr") or self.vendor not in TIFF_LEVEL_VENDORS:
            return None
        import tifffile

        if self._tiff is None:
            self._tiff = tifffile.TiffFile(self.path)
        tiled = (page for page in self._tiff.pages if page.is_tiled)  # parsed as needed
        page = next(itertools.islice(tiled, level, None), None)
        if page is None:
            return None
        w, h = self.level_dimensions[level]
        ok = (
            page.shape == (h, w, 3)
            and page.dtype == np.uint8
            and page.planarconfig == 1  # samples interleaved
            and page.compression.name in TIFF_LEVEL_CODECS
            and all(page.databytecounts)
        )
        return page if ok else None

    def read_level(self, level: int) -> np.ndarray:
        """The whole pyramid ``level`` as RGB uint8 (h x w x 3): the pixels of
        :meth:`read_region` over it. A level stored as a tiled TIFF page tifffile decodes
        alike (:meth:`_level_page`) is decoded tile by tile, in threads; others are read
        through OpenSlide in chunks (memory: the level plus one chunk)."""
        try:
            page = self._level_page(level)
            if page is not None:
                return page.asarray()
        except Exception as exc:  # noqa: BLE001 - a damaged tile: OpenSlide's read says so
            log.debug("%s: level %d not decoded by tifffile (%s)", self.path, level, exc)
        return self._read_level_scaled(level, 1.0)

    def detection_thumbnail(self, mpp: float, coarser: float = 1.25) -> np.ndarray:
        """The whole slide for tissue detection at about ``mpp`` um/px (RGB uint8), read
        from the pyramid as cheaply as the resolution allows.

        The coarsest level no coarser than ``coarser`` x ``mpp`` is read as it is (no
        resampling) when it is at least half as coarse as ``mpp``: with ``mpp`` 16, a
        16-um level, or an 8-um one when the next is 32. A slide without such a level
        (a single-level image, or levels that stop at 4 um) is read in chunks from its
        coarsest finer level and downsampled to ``mpp`` (:meth:`thumbnail_at_mpp`). The
        image's resolution is ``mpp * width / image width``.
        """
        level = self.best_level(coarser * mpp / self.mpp)
        level_mpp = self.mpp * float(self.level_downsamples[level])
        return self.read_level(level) if level_mpp >= mpp / 2 else self.thumbnail_at_mpp(mpp)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mpp = f"{self.resolution.mpp:.4f} ({self.resolution.source})" if self.resolution else "?"
        return f"Slide({str(self.path)!r}, {self.dimensions[0]}x{self.dimensions[1]}, mpp={mpp})"
