"""Synthesis of one whole-slide image from real H&E texture.

A slide is laid out at low resolution as smooth *fields* (tissue pieces, tumour
regions, pen strokes), then rendered at full resolution strip by strip:

- fields are upsampled bilinearly, so region borders are smooth and resolution-free;
- tissue is filled by *quilting*: overlapping square patches cut from blocks of a real
  texture (random offset, 90-degree rotation and flip) blended with linear ramps
  whose weights sum to one, so no seams show;
- normal tissue comes from one normal texture, tumour regions from one tumour texture
  (see :mod:`pipeline.data.textures`); both are stain-shifted per slide in
  haematoxylin-eosin-DAB space (Ruifrok & Johnston, 2001) to mimic scanning sites;
- pen ink and debris are drawn on the glass around the tissue.

Memory is bounded by one level-0 RGB image plus one strip of float buffers.
Ground-truth masks (tissue, tumour, pen) come from the same fields, at
``mask_downsample`` level-0 px per mask px: a block is inside when more than half
of it is covered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage.color import hed2rgb, rgb2hed
from skimage.draw import disk, line

STRIP = 256  # rows per rendered strip (level-0 px)


@dataclass
class Stain:
    """Multiplicative shift of the H, E and DAB concentrations plus a background tint."""

    h: float = 1.0
    e: float = 1.0
    d: float = 1.0
    background: tuple[int, int, int] = (242, 241, 240)


@dataclass
class SlideLayout:
    """Everything that decides a slide, at mask resolution (``mask_downsample`` px per cell)."""

    width: int
    height: int
    mask_downsample: int
    tissue_field: np.ndarray  # mh x mw, > 0 inside tissue
    tumor_field: np.ndarray | None  # mh x mw, > 0 inside tumour (already within tissue)
    pen_field: np.ndarray | None  # mh x mw, ink opacity in [0, 1]
    pen_color: tuple[int, int, int] = (40, 60, 160)
    debris: list[tuple[int, int, int]] = field(default_factory=list)  # (x, y, radius) level 0


def stain_shift(hed: np.ndarray, stain: Stain) -> np.ndarray:
    """RGB uint8 image from H, E, DAB concentrations (``rgb2hed`` output) scaled by ``stain``.

    Colour deconvolution after Ruifrok & Johnston (2001), through scikit-image.
    """
    scaled = hed * np.asarray([stain.h, stain.e, stain.d], dtype=hed.dtype)  # H x W x 3
    return np.clip(hed2rgb(scaled) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def to_hed(image: np.ndarray) -> np.ndarray:
    """H, E, DAB concentrations (float32) of an RGB uint8 image."""
    return rgb2hed(image).astype(np.float32)


def window_tissue(image: np.ndarray, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left ``(y, x)`` offsets of ``patch``-px windows of ``image`` on an 8-px grid, and
    the share of tissue in each.

    Tissue is where HSV-like saturation (max - min over RGB) exceeds 20/255; the
    windows are scored with a summed-area table on the 8x coarser grid. ``patch`` must fit
    in ``image``.
    """
    step = 8
    small = image[::step, ::step].astype(np.int16)
    tissue = (small.max(-1) - small.min(-1)) > 20
    sat = np.pad(tissue.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    k = max(1, patch // step)
    frac = (sat[k:, k:] - sat[:-k, k:] - sat[k:, :-k] + sat[:-k, :-k]) / (k * k)
    ys, xs = np.nonzero(np.ones_like(frac, bool))
    ys = np.minimum(ys * step, image.shape[0] - patch)
    xs = np.minimum(xs * step, image.shape[1] - patch)
    return np.stack([ys, xs], axis=1), frac.ravel()


class Quilt:
    """Deterministic patch quilting of a set of texture blocks over a grid of cells.

    Patches are ``patch`` px squares cut from the ``blocks`` (each patch inside one block,
    at a random tissue-dense offset, with a random 90-degree rotation and flip). Cell
    ``(r, c)`` covers level-0 rows ``[r*stride - overlap, (r+1)*stride)`` and the same in
    x (``stride = patch - overlap``); its weight ramps linearly over the first and last
    ``overlap`` px so that neighbouring weights sum to exactly one.
    """

    def __init__(
        self,
        blocks: list[np.ndarray],
        patch: int,
        height: int,
        width: int,
        rng: np.random.Generator,
    ):
        self.blocks = blocks
        self.patch = patch
        self.overlap = max(2, patch // 5)
        self.stride = patch - self.overlap
        self.rows, self.cols = -(-height // self.stride) + 1, -(-width // self.stride) + 1
        shape = (self.rows, self.cols)
        # candidate windows of every block: those at least 80% tissue (where no window of
        # any block is, the 64 densest), drawn uniformly over all blocks
        windows = [window_tissue(image, patch) for image in blocks]
        dense = max(f.max() for _, f in windows) >= 0.8
        where, offsets = [], []
        for b, (offs, frac) in enumerate(windows):
            keep = frac >= 0.8 if dense else frac >= np.sort(frac)[-min(64, len(frac))]
            where.append(np.full(int(keep.sum()), b))
            offsets.append(offs[keep])
        where, offsets = np.concatenate(where), np.concatenate(offsets)
        pick = rng.integers(0, len(where), size=shape)  # rows x cols
        self.block = where[pick]  # rows x cols
        self.offsets = offsets[pick]  # rows x cols x 2 (y, x in the block)
        self.turns = rng.integers(0, 4, size=shape)
        self.flips = rng.integers(0, 2, size=shape).astype(bool)
        t = np.arange(patch, dtype=np.float32) + 0.5
        self.ramp = np.minimum(np.minimum(t / self.overlap, (patch - t) / self.overlap), 1.0)

    def patch_at(self, r: int, c: int) -> np.ndarray:
        y, x = self.offsets[r, c]
        p = self.blocks[self.block[r, c]][y : y + self.patch, x : x + self.patch]  # P x P x 3
        p = np.rot90(p, self.turns[r, c])
        return p[:, ::-1] if self.flips[r, c] else p

    def cells_touching(self, region: np.ndarray, ds: int) -> np.ndarray:
        """Cells (``rows x cols``) that overlap a mask-resolution ``region`` (``ds`` level-0
        px per mask px), dilated by one cell."""

        def incidence(n_cells: int, n_mask: int) -> np.ndarray:  # n_cells x n_mask
            start = np.arange(n_cells)[:, None] * self.stride - self.overlap
            i = np.arange(n_mask)[None, :] * ds
            return ((start < i + ds) & (start + self.patch > i)).astype(np.float32)

        rows = incidence(self.rows, region.shape[0])
        cols = incidence(self.cols, region.shape[1])
        cells = (rows @ region.astype(np.float32) @ cols.T) > 0
        return ndimage.binary_dilation(cells, np.ones((3, 3), bool))

    def render(self, y0: int, y1: int, xa: int, xb: int, need: np.ndarray) -> np.ndarray:
        """Rows ``[y0, y1)`` x columns ``[xa, xb)`` of the quilt (float32, ``n x m x 3``).

        ``need[r, c]`` says whether cell ``(r, c)`` touches the region to be filled;
        cells that do not are skipped (their pixels are never shown).
        """
        s, o, size = self.stride, self.overlap, self.patch
        out = np.zeros((y1 - y0, xb - xa, 3), np.float32)  # n x m x 3
        for r in range(y0 // s, min(self.rows, (y1 + o - 1) // s + 1)):
            top = r * s - o - y0  # patch row 0 in output coordinates
            a, b = max(0, top), min(y1 - y0, top + size)
            wy = self.ramp[a - top : b - top, None, None]
            for c in range(xa // s, min(self.cols, (xb + o - 1) // s + 1)):
                if not need[r, c]:
                    continue
                left = c * s - o - xa  # patch column 0 in output coordinates
                u, v = max(0, left), min(xb - xa, left + size)
                if a >= b or u >= v:
                    continue
                patch = self.patch_at(r, c)[a - top : b - top, u - left : v - left]
                out[a:b, u:v] += patch * wy * self.ramp[None, u - left : v - left, None]
        return out


def _lerp(field: np.ndarray, pos: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation of ``field`` along ``axis`` at fractional indices ``pos``."""
    n = field.shape[axis]
    pos = np.clip(pos, 0, n - 1).astype(np.float32)
    lo = np.minimum(pos.astype(np.int64), max(n - 2, 0))
    hi = np.minimum(lo + 1, n - 1)
    w = pos - lo
    if axis == 0:
        return field[lo] * (1 - w)[:, None] + field[hi] * w[:, None]
    return field[:, lo] * (1 - w)[None, :] + field[:, hi] * w[None, :]


def _level0_to_mask(coords: np.ndarray, ds: int) -> np.ndarray:
    """Fractional mask-grid index of level-0 pixel centres (bilinear sampling convention)."""
    return (coords.astype(np.float32) + 0.5) / ds - 0.5


def signed_distance(field: np.ndarray) -> np.ndarray:
    """Rescale a smooth field so that it reads as distance (in its own px) from its zero level."""
    gy, gx = np.gradient(field)
    return field / np.maximum(np.hypot(gy, gx), 1e-3)


def field_masks(layout: SlideLayout, supersample: int = 4) -> dict[str, np.ndarray]:
    """Ground-truth masks at mask resolution: blocks more than half covered by each region.

    Coverage is estimated on ``supersample`` x ``supersample`` level-0 points per block,
    from the same bilinear fields that :func:`render_slide` draws.
    """
    ds, sub = layout.mask_downsample, supersample
    mh, mw = layout.tissue_field.shape
    ys = (np.arange(mh * sub) + 0.5) * ds / sub - 0.5  # level-0 y of the sample points
    xs = (np.arange(mw * sub) + 0.5) * ds / sub - 0.5
    inside = (ys < layout.height)[:, None] & (xs < layout.width)[None, :]

    def sample(f: np.ndarray) -> np.ndarray:
        return _lerp(_lerp(f, _level0_to_mask(xs, ds), 1), _level0_to_mask(ys, ds), 0)

    def share(region: np.ndarray) -> np.ndarray:
        return (region & inside).reshape(mh, sub, mw, sub).mean(axis=(1, 3)) >= 0.5

    tissue = sample(layout.tissue_field)
    masks = {"tissue": share(tissue > 0)}
    zero = np.zeros((mh, mw), bool)
    tumor, pen = layout.tumor_field, layout.pen_field
    masks["tumor"] = zero if tumor is None else share((sample(tumor) > 0) & (tissue > 0))
    masks["pen"] = zero if pen is None else share((sample(pen) > 0.3) & (tissue <= 0))
    return masks


def render_slide(
    layout: SlideLayout,
    quilts: dict[str, Quilt],
    background: tuple[int, int, int],
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render a slide's level-0 RGB image (``H x W x 3`` uint8).

    ``quilts["normal"]`` fills the tissue, ``quilts["tumor"]`` (when the layout has a
    tumour field) the tumour regions; their blocks are stained RGB textures already at the
    slide's mpp. Only the columns of each strip that hold tissue or ink are blended in
    float; the rest is the glass background. Returns the image and, per quilt, the cells
    that were drawn (``rows x cols`` bool).
    """
    h, w, ds = layout.height, layout.width, layout.mask_downsample
    fields = {"tissue": layout.tissue_field, "tumor": layout.tumor_field, "pen": layout.pen_field}
    fields = {k: v for k, v in fields.items() if v is not None}
    for name in ("tissue", "tumor"):  # as signed distances in level-0 px, for crisp edges
        if name in fields:
            fields[name] = signed_distance(fields[name]) * ds
    need = {"normal": quilts["normal"].cells_touching(fields["tissue"] > -ds, ds)}
    if "tumor" in fields:
        need["tumor"] = quilts["tumor"].cells_touching(fields["tumor"] > -ds, ds)
    fields_x = {k: _lerp(v, _level0_to_mask(np.arange(w), ds), 1) for k, v in fields.items()}
    active_lr = fields["tissue"] > -ds
    if "pen" in fields:
        active_lr |= fields["pen"] > 0.01

    # Glass: background tint plus a faint grain, cut at a random offset for each strip.
    grain = rng.normal(0.0, 1.5, size=(2 * STRIP, w + STRIP, 1))
    glass = np.clip(np.asarray(background) + grain + 0.5, 0, 255).astype(np.uint8)
    ink = np.asarray(layout.pen_color, np.float32) / 255.0
    soft = 1.5  # level-0 px over which region edges blend
    image = np.empty((h, w, 3), np.uint8)
    for k in range(-(-h // STRIP)):
        y0, y1 = k * STRIP, min(h, (k + 1) * STRIP)
        oy, ox = rng.integers(0, STRIP, size=2)
        image[y0:y1] = glass[oy : oy + y1 - y0, ox : ox + w]
        cols_lr = np.nonzero(active_lr[max(0, y0 // ds - 1) : y1 // ds + 2].any(axis=0))[0]
        if len(cols_lr) == 0:
            continue
        xa, xb = max(0, (cols_lr[0] - 1) * ds), min(w, (cols_lr[-1] + 2) * ds)
        rows_lr = _level0_to_mask(np.arange(y0, y1), ds)
        f = {name: _lerp(fx[:, xa:xb], rows_lr, 0) for name, fx in fields_x.items()}

        strip = image[y0:y1, xa:xb].astype(np.float32)  # n x m x 3
        tex = quilts["normal"].render(y0, y1, xa, xb, need["normal"])
        if "tumor" in f:
            beta = np.clip(f["tumor"] / soft + 0.5, 0.0, 1.0)[..., None]  # n x m x 1
            tex += beta * (quilts["tumor"].render(y0, y1, xa, xb, need["tumor"]) - tex)
        alpha = np.clip(f["tissue"] / soft + 0.5, 0.0, 1.0)[..., None]  # n x m x 1
        strip += alpha * (tex - strip)
        if "pen" in f:
            opacity = np.clip(f["pen"], 0.0, 0.9)[..., None] * (1.0 - alpha)
            strip *= 1.0 - opacity * (1.0 - ink)
        image[y0:y1, xa:xb] = np.clip(strip + 0.5, 0, 255).astype(np.uint8)

    for x, y, r in layout.debris:
        rr, cc = disk((y, x), r, shape=(h, w))
        image[rr, cc] = (np.asarray([70, 50, 45]) + rng.integers(-15, 15, 3)).astype(np.uint8)
    return image, need


def smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian-filtered white noise of ``shape``."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (noise / (noise.std() + 1e-8)).astype(np.float32)


def blob_field(
    shape: tuple[int, int],
    center: tuple[float, float],
    radii: tuple[float, float],
    angle: float,
    wobble: np.ndarray,
    amount: float,
) -> np.ndarray:
    """A rotated ellipse distorted by noise: ``> 0`` inside, in units of the ellipse radius."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    dy, dx = yy - center[0], xx - center[1]
    ca, sa = np.cos(angle), np.sin(angle)
    u, v = (dx * ca + dy * sa) / radii[1], (-dx * sa + dy * ca) / radii[0]
    return 1.0 - np.sqrt(u * u + v * v) + amount * wobble


def pen_stroke_field(
    shape: tuple[int, int], points: list[tuple[int, int]], width: float
) -> np.ndarray:
    """Opacity field of a polyline through ``points`` (y, x) in mask px, soft-edged."""
    canvas = np.zeros(shape, np.float32)
    for (y0, x0), (y1, x1) in zip(points[:-1], points[1:], strict=False):
        rr, cc = line(int(y0), int(x0), int(y1), int(x1))
        keep = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
        canvas[rr[keep], cc[keep]] = 1.0
    canvas = ndimage.gaussian_filter(canvas, width / 2.0)
    return np.clip(canvas / (canvas.max() + 1e-8) * 1.6, 0.0, 1.0)
