"""Online patching: tiles drawn at random positions inside the tissue, at several resolutions.

Midnight (Karasikov et al., "Training state-of-the-art pathology foundation models with
orders of magnitude less data", kaiko.ai 2025, with the online patching of Aben et al.,
"Towards large-scale training of pathology foundation models", 2024) pretrains on tiles
cut online from the slides rather than on a fixed grid: each 256-px tile comes from a
random position inside the tissue, at a resolution drawn from a mix (0.25, 0.5, 1 and
2 um/px; the paper does not say how the mix is weighted, so the weights are a setting),
and is kept when at least 40% of it is tissue. Fixed-grid tiles (the coords files' rows,
:class:`pipeline.data.tiles.TileDataset`) stay the other mode. One ``cpath preprocess`` run
serves every resolution: its tissue polygons (``tissue/<slide_id>.geojson``, level-0 px)
say where tissue is, its coords files (``coords/<slide_id>.h5``) say which slide and at
what level-0 resolution. No pixel of a slide is read to place a tile; only the tile itself
is read.

A draw is a pure function of ``(seed, index)`` (:meth:`OnlinePatches.draw`):

1. the slide, from ``np.random.default_rng([seed, 1, index // tiles_per_visit])``: uniform
   over the slides (``slide_weights="uniform"``), proportional to tissue area
   (``"tissue"``, the polygons' area in um^2) or to given weights; slides that can serve no
   resolution never come up;
2. from ``np.random.default_rng([seed, 0, index])``: the resolution, by ``mpp_weights``
   among the mpps the slide can serve (weights renormalised): a tile of ``tile_px`` px at
   ``mpp`` covers ``size0 = round(tile_px * mpp / level0_mpp)`` level-0 px per side, and
   the slide serves ``mpp`` when that square fits in the slide and ``mpp`` is not finer
   than its level 0 (``mpp >= level0_mpp * (1 - MPP_TOLERANCE)``, unless
   ``allow_upsampling``);
3. the position, with the resolution fixed (so rejections never skew the resolution mix):
   a tissue cell of the slide's :class:`TissueIndex` uniformly, a uniform point in it as
   the tile centre; kept when the tile lies inside the slide, its centre inside a tissue
   polygon and its tissue share on the mask is at least ``min_tissue``; else the next
   candidate of the same generator, up to ``max_tries``;
4. after ``max_tries`` rejections, the fallback: the tile centred on the centre of the
   slide's coords-file grid tile nearest the first candidate (a tile that preprocessing
   kept), shifted into the slide; :class:`PatchLocation` flags it (``fallback``) and gives
   its tissue share, which may be below ``min_tissue`` when the tile is much larger than
   the grid's. A slide whose mask holds no tissue cell goes to the fallback directly.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from skimage.measure import points_in_poly
from torch.utils.data import Dataset

from pipeline.errors import ConfigError, PipelineError
from pipeline.wsi.coords import Coords, read_coords
from pipeline.wsi.reader import MPP_TOLERANCE, Slide

log = logging.getLogger(__name__)

MASK_MPP = 8.0  # um per mask cell: the resolution `cpath preprocess` detects tissue at
MAX_MASK_CELLS = 1 << 23  # cells per slide mask (1 byte each); coarser cells beyond
SLIDE_WEIGHTINGS = ("uniform", "tissue")

Polygon = list[np.ndarray]  # [exterior, *holes], each K x 2 float64 level-0 (x, y)


# -- tissue polygons --------------------------------------------------------------------
def tissue_geojson_path(coords_file: str | os.PathLike, slide_id: str) -> Path:
    """Where ``cpath preprocess`` wrote a slide's tissue: ``<out>/tissue/<slide_id>.geojson``
    beside ``<out>/coords/<slide_id>.h5`` (beside the link's folder, else beside the file a
    linked coords file points to)."""
    name = Path("tissue") / f"{slide_id}.geojson"
    given = Path(coords_file).absolute().parent.parent / name
    if given.is_file():
        return given
    real = Path(coords_file).resolve().parent.parent / name
    return real if real.is_file() else given


def _geometries(data: dict) -> list[dict]:
    kind = data.get("type")
    if kind == "FeatureCollection":
        return [g for f in data.get("features") or [] for g in _geometries(f)]
    if kind == "Feature":
        return _geometries(data.get("geometry") or {})
    if kind == "GeometryCollection":
        return [g for part in data.get("geometries") or [] for g in _geometries(part)]
    return [data] if kind in ("Polygon", "MultiPolygon") else []


def load_tissue_polygons(path: str | os.PathLike) -> list[Polygon]:
    """The tissue polygons of a GeoJSON file (``cpath preprocess``'s ``tissue/`` or an edited
    export of QuPath): per piece ``[exterior, *holes]``, rings ``K x 2`` float64 level-0
    (x, y). ``Polygon`` and ``MultiPolygon`` geometries are read; others are ignored."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(
            f"{path}: no tissue GeoJSON for this slide. Online patching places tiles inside "
            "the tissue that `cpath preprocess` saves as tissue/<slide_id>.geojson beside "
            "coords/; rerun `cpath preprocess` on the slides (or pass the folder that holds "
            "the GeoJSON files as tissue_dir)."
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(
            f"{path}: cannot read the tissue GeoJSON ({exc}); rerun `cpath preprocess` on "
            "this slide."
        ) from exc
    polygons: list[Polygon] = []
    for geometry in _geometries(data if isinstance(data, dict) else {}):
        coords = geometry.get("coordinates") or []
        pieces = coords if geometry["type"] == "MultiPolygon" else [coords]
        for rings in pieces:
            arrays = [np.asarray(r, np.float64).reshape(len(r), -1)[:, :2] for r in rings if r]
            if arrays and len(arrays[0]) >= 3:
                polygons.append([a for a in arrays if len(a) >= 3])
    return polygons


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def polygons_area(polygons: Sequence[Polygon]) -> float:
    """Area of tissue polygons (exteriors less holes), in squared level-0 px."""
    return float(sum(_ring_area(p[0]) - sum(_ring_area(h) for h in p[1:]) for p in polygons))


# -- tissue index -------------------------------------------------------------------------
def _coverage(a: float, b: float, n: int) -> tuple[int, np.ndarray]:
    """First cell and the covered share of each cell of ``range(n)`` (cell i spans
    ``[i, i + 1)``) by the interval ``[a, b)``."""
    i0, i1 = max(0, math.floor(a)), min(n, math.ceil(b))
    if i0 >= i1:
        return i0, np.zeros(0)
    cells = np.arange(i0, i1, dtype=np.float64)
    return i0, np.clip(np.minimum(cells + 1, b) - np.maximum(cells, a), 0.0, 1.0)


def _fill(rings: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Cells of an ``h x w`` grid whose centres lie inside ``rings`` (K x 2 (x, y) in
    cell-centre coordinates: cell (i, j) is centred at (j, i)) by the even-odd rule, so the
    holes of a piece are cut out. Scanlines through the cell centres: time and memory
    O(cells + crossings), whatever the number of vertices."""
    h, w = shape
    rows, xs = [], []
    for ring in rings:
        x1, y1 = ring[:, 0], ring[:, 1]
        x2, y2 = np.roll(x1, -1), np.roll(y1, -1)  # edges, the ring closed
        first = np.clip(np.ceil(np.minimum(y1, y2)), 0, h).astype(np.int64)
        stop = np.clip(np.ceil(np.maximum(y1, y2)), 0, h).astype(np.int64)  # rows [lo, hi)
        n = np.maximum(stop - first, 0)  # rows each edge crosses (0 for horizontal edges)
        if not n.any():
            continue
        edge = np.repeat(np.arange(len(n)), n)
        row = first[edge] + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        t = (row - y1[edge]) / (y2[edge] - y1[edge])
        rows.append(row)
        xs.append(x1[edge] + t * (x2[edge] - x1[edge]))
    mask = np.zeros(shape, bool)
    if not rows:
        return mask
    row, x = np.concatenate(rows), np.concatenate(xs)
    order = np.lexsort((x, row))  # by row, then x: each row has an even number of crossings
    row, x = row[order], x[order]
    edges = np.zeros((h, w + 1), np.int32)
    start = np.clip(np.ceil(x[0::2]), 0, w).astype(np.int64)  # cells j with x_a <= j < x_b
    stop = np.clip(np.ceil(x[1::2]), 0, w).astype(np.int64)
    np.add.at(edges, (row[0::2], start), 1)
    np.add.at(edges, (row[0::2], stop), -1)
    return np.cumsum(edges, axis=1)[:, :w] > 0


@dataclass(frozen=True, eq=False)
class TissueIndex:
    """A slide's tissue as a coarse boolean mask, to draw tile positions from.

    The slide's level-0 plane is cut into square cells of ``cell0`` level-0 px (about
    ``mask_mpp`` um); a cell is tissue when its centre lies inside a tissue polygon (holes
    excluded). Only the cells of the polygons' bounding box are stored (``mask``, one byte
    per cell; ``origin`` is the (column, row) of ``mask[0, 0]``), plus the tissue cells
    counted per row, so a tissue cell is drawn uniformly in O(width) time and memory stays
    near ``mask.size`` bytes (:attr:`nbytes`): about 3.5 MB for 15 x 15 mm of tissue at
    8 um per cell, never above ``max_cells`` bytes plus the polygons.
    """

    mask: np.ndarray  # h x w bool, cells of the tissue's bounding box
    origin: tuple[int, int]  # (col, row) of mask[0, 0] in the slide's cell grid
    cell0: float  # level-0 px per cell side
    width0: int  # slide level-0 width
    height0: int  # slide level-0 height
    level0_mpp: float
    row_cum: np.ndarray  # h + 1 int64: tissue cells in the rows above each row
    polygons: list[Polygon]
    boxes: np.ndarray  # P x 4 float64 level-0 (x0, y0, x1, y1) of each exterior

    @classmethod
    def build(
        cls,
        polygons: Sequence[Polygon],
        width0: int,
        height0: int,
        level0_mpp: float,
        mask_mpp: float = MASK_MPP,
        max_cells: int = MAX_MASK_CELLS,
    ) -> TissueIndex:
        """Rasterise ``polygons`` (level-0 px) into cells of about ``mask_mpp`` um (coarser
        when the tissue's bounding box would need more than ``max_cells`` cells)."""
        if mask_mpp <= 0 or level0_mpp <= 0:
            raise ValueError(f"mask_mpp {mask_mpp} and level0_mpp {level0_mpp} must be > 0")
        polygons = [[np.asarray(r, np.float64) for r in p] for p in polygons]
        cell0 = mask_mpp / level0_mpp
        if polygons:
            points = np.concatenate([p[0] for p in polygons])  # K x 2
            low = np.clip(points.min(0), 0, (width0, height0))
            high = np.clip(points.max(0), 0, (width0, height0))
            boxes = np.array([[*p[0].min(0), *p[0].max(0)] for p in polygons], np.float64)
        else:
            low = high = np.zeros(2)
            boxes = np.zeros((0, 4))

        def extent(cell: float) -> tuple[int, int, int, int]:
            c0, r0 = (math.floor(v / cell) for v in low)
            c1, r1 = (math.ceil(v / cell) for v in high)
            return c0, r0, max(c1, c0), max(r1, r0)

        c0, r0, c1, r1 = extent(cell0)
        while (c1 - c0) * (r1 - r0) > max_cells:  # bounded memory: coarser cells
            cell0 *= max(1.01, math.sqrt((c1 - c0) * (r1 - r0) / max_cells))
            c0, r0, c1, r1 = extent(cell0)
        mask = np.zeros((r1 - r0, c1 - c0), bool)
        for rings in polygons:
            # cell-centre coordinates in the crop: cell (i, j) has its centre at (j, i)
            local = [r / cell0 - 0.5 - (c0, r0) for r in rings]
            pc0, pr0 = (max(0, math.floor(v)) for v in local[0].min(0))
            pc1 = min(mask.shape[1], math.ceil(local[0][:, 0].max()) + 1)
            pr1 = min(mask.shape[0], math.ceil(local[0][:, 1].max()) + 1)
            if pc0 < pc1 and pr0 < pr1:  # pieces may nest (an island in a hole): OR them
                piece = _fill([r - (pc0, pr0) for r in local], (pr1 - pr0, pc1 - pc0))
                mask[pr0:pr1, pc0:pc1] |= piece
        row_cum = np.concatenate([[0], np.cumsum(mask.sum(1), dtype=np.int64)])
        return cls(
            mask=mask,
            origin=(c0, r0),
            cell0=cell0,
            width0=int(width0),
            height0=int(height0),
            level0_mpp=float(level0_mpp),
            row_cum=row_cum,
            polygons=polygons,
            boxes=boxes,
        )

    @classmethod
    def from_geojson(
        cls,
        path: str | os.PathLike,
        width0: int,
        height0: int,
        level0_mpp: float,
        mask_mpp: float = MASK_MPP,
        max_cells: int = MAX_MASK_CELLS,
    ) -> TissueIndex:
        """:meth:`build` from a tissue GeoJSON file (:func:`load_tissue_polygons`)."""
        polygons = load_tissue_polygons(path)
        return cls.build(polygons, width0, height0, level0_mpp, mask_mpp, max_cells)

    @property
    def cells(self) -> int:
        """Tissue cells of the mask."""
        return int(self.row_cum[-1])

    @property
    def cell_mpp(self) -> float:
        """um per cell side."""
        return self.cell0 * self.level0_mpp

    @property
    def nbytes(self) -> int:
        """Memory held: mask, row counts and polygons."""
        rings = sum(r.nbytes for p in self.polygons for r in p)
        return self.mask.nbytes + self.row_cum.nbytes + rings + self.boxes.nbytes

    def tissue_share(self, x0: float, y0: float, size0: float) -> float:
        """Tissue share (0-1) of the level-0 square ``[x0, x0 + size0) x [y0, y0 + size0)``
        on the mask, each cell weighted by the part of it the square covers (as
        :func:`pipeline.wsi.tiling.tile_grid` weighs the tissue of grid tiles)."""
        if size0 <= 0:
            return 0.0
        c0, r0 = self.origin
        ax, ay = x0 / self.cell0 - c0, y0 / self.cell0 - r0
        span = size0 / self.cell0
        j0, wx = _coverage(ax, ax + span, self.mask.shape[1])
        i0, wy = _coverage(ay, ay + span, self.mask.shape[0])
        if not len(wx) or not len(wy):
            return 0.0
        window = self.mask[i0 : i0 + len(wy), j0 : j0 + len(wx)].astype(np.float64)  # h x w
        return float(min(1.0, wy @ window @ wx / (span * span)))

    def in_tissue(self, x: float, y: float) -> bool:
        """Whether the level-0 point ``(x, y)`` lies inside a tissue polygon (not a hole)."""
        b = self.boxes
        near = np.flatnonzero((b[:, 0] <= x) & (x <= b[:, 2]) & (b[:, 1] <= y) & (y <= b[:, 3]))
        point = np.array([[x, y]], np.float64)
        for i in near:
            rings = self.polygons[i]
            if points_in_poly(point, rings[0])[0] and not any(
                points_in_poly(point, hole)[0] for hole in rings[1:]
            ):
                return True
        return False

    def cell(self, k: int) -> tuple[int, int]:
        """(row, col) in ``mask`` of the ``k``-th tissue cell in raster order."""
        if not 0 <= k < self.cells:
            raise IndexError(f"tissue cell {k} out of range for {self.cells} cells")
        row = int(np.searchsorted(self.row_cum, k, side="right")) - 1
        col = int(np.flatnonzero(self.mask[row])[k - self.row_cum[row]])
        return row, col

    def sample_centre(self, rng: np.random.Generator) -> tuple[float, float]:
        """A level-0 point uniform in a tissue cell drawn uniformly (3 draws of ``rng``)."""
        row, col = self.cell(int(rng.integers(self.cells)))
        u, v = rng.random(2)
        c0, r0 = self.origin
        return (c0 + col + float(u)) * self.cell0, (r0 + row + float(v)) * self.cell0


# -- online patches -----------------------------------------------------------------------
@dataclass(frozen=True)
class PatchLocation:
    """Where a drawn tile lies: slide index, level-0 top-left and side, resolution."""

    slide: int
    x0: int
    y0: int
    size0: int  # level-0 px per side: round(tile_px * mpp / level0_mpp)
    mpp: float
    tissue_share: float  # on the slide's tissue mask
    tries: int  # candidates drawn (max_tries for a fallback)
    fallback: bool  # no candidate passed: centred on the nearest grid tile instead

    def as_tuple(self) -> tuple[int, int, int, int, float]:
        return self.slide, self.x0, self.y0, self.size0, self.mpp


def _cdf(weights: np.ndarray) -> np.ndarray:
    total = float(weights.sum())
    return np.cumsum(weights) / total if total > 0 else np.zeros(len(weights))


def _pick(cdf: np.ndarray, u: float) -> int:
    return min(int(np.searchsorted(cdf, u, side="right")), len(cdf) - 1)


class OnlinePatches(Dataset):
    """Tiles at random positions inside the tissue of a preprocess run's slides, at a mix
    of resolutions (Midnight's online patching, Karasikov et al. 2025; module docstring).

    Args:
        coords: coords files (``cpath preprocess``'s ``coords/*.h5``) or read
            :class:`~pipeline.wsi.coords.Coords` tables, one per slide.
        mpps: resolutions of the tiles, um per px.
        mpp_weights: relative frequency of each resolution (default: equal).
        tile_px: tile side in px, at every resolution.
        min_tissue: lowest tissue share of a kept tile on the tissue mask (Midnight: 0.4).
        seed: seed of the draws (a non-negative int).
        length: draws of one pass (``len``; every index >= 0 draws); default: the grid
            tiles of the coords files.
        tissue_dir: folder of the ``<slide_id>.geojson`` tissue files; default: the
            ``tissue/`` folder beside each coords file's folder (required for tables).
        slide_weights: ``"uniform"`` (every slide equally often), ``"tissue"`` (in
            proportion to its tissue area, which reads every GeoJSON once here) or one
            non-negative weight per slide.
        tiles_per_visit: consecutive indices that share a slide (``index // k`` draws it),
            so that a sequential reader opens a slide once per ``k`` tiles.
        max_tries: candidate positions per draw before the fallback.
        allow_upsampling: serve resolutions finer than a slide's level 0 (upsampled).
        mask_mpp: um per tissue-mask cell (8: the resolution tissue is detected at).
        max_mask_cells: most cells of one mask (its bytes); coarser cells beyond.
        slide_paths: ``{slide_id: path}`` for slides moved since preprocessing.
        transform: applied to each ``3 x tile_px x tile_px`` uint8 tensor by ``__getitem__``.
        max_open_slides: slides kept open per process.
        max_tissue_indexes: tissue indexes kept per process (built lazily, LRU).
    """

    def __init__(
        self,
        coords: Sequence[str | os.PathLike | Coords] | str | os.PathLike,
        mpps: Sequence[float] = (0.25, 0.5, 1.0, 2.0),
        mpp_weights: Sequence[float] | None = None,
        tile_px: int = 256,
        min_tissue: float = 0.4,
        seed: int = 0,
        length: int | None = None,
        tissue_dir: str | os.PathLike | None = None,
        slide_weights: str | Sequence[float] = "uniform",
        tiles_per_visit: int = 1,
        max_tries: int = 32,
        allow_upsampling: bool = False,
        mask_mpp: float = MASK_MPP,
        max_mask_cells: int = MAX_MASK_CELLS,
        slide_paths: dict[str, str | os.PathLike] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        max_open_slides: int = 16,
        max_tissue_indexes: int = 8,
    ):
        if isinstance(coords, str | os.PathLike):
            coords = [coords]
        mpp_weights = [1.0] * len(mpps) if mpp_weights is None else list(mpp_weights)
        self._validate(mpps, mpp_weights, tile_px, min_tissue, seed, length, tiles_per_visit)
        if max_tries < 1 or mask_mpp <= 0 or max_mask_cells < 1:
            raise ConfigError("max_tries, mask_mpp and max_mask_cells must be positive")
        if not coords:
            raise ConfigError("online patching needs coords files: none given")
        self.tables: list[Coords] = []
        self.slide_ids: list[str] = []
        self.tissue_files: list[Path] = []
        for item in coords:
            table = item if isinstance(item, Coords) else read_coords(item)
            source = None if isinstance(item, Coords) else Path(item)
            slide_id = table.attrs.get("slide_id") or table.attrs.get("name")
            slide_id = str(slide_id or (source.stem if source else ""))
            if not slide_id:
                raise ConfigError("a Coords table without a slide_id attribute; name its slide")
            if tissue_dir is not None:
                geojson = Path(tissue_dir) / f"{slide_id}.geojson"
            elif source is not None:
                geojson = tissue_geojson_path(source, slide_id)
            else:
                raise ConfigError(
                    f"slide '{slide_id}': Coords tables do not say where their preprocess run "
                    "is; pass tissue_dir (the run's tissue/ folder)."
                )
            self.tables.append(table)
            self.slide_ids.append(slide_id)
            self.tissue_files.append(geojson)
        missing = [str(f) for f in self.tissue_files if not f.is_file()]
        if missing:
            raise PipelineError(
                f"online patching needs the tissue of every slide; missing for "
                f"{len(missing)} of {len(self.tissue_files)}: {', '.join(missing[:3])}; "
                "rerun `cpath preprocess` on those slides (it writes tissue/<slide_id>.geojson "
                "beside coords/), or pass tissue_dir."
            )
        pairs = zip(self.tables, self.slide_ids, strict=True)
        self.paths = [self._slide_path(t, i, slide_paths or {}) for t, i in pairs]
        self.mpps = np.asarray(mpps, np.float64)
        self.mpp_weights = np.asarray(mpp_weights, np.float64)
        self.tile_px, self.min_tissue, self.seed = int(tile_px), float(min_tissue), int(seed)
        self.tiles_per_visit, self.max_tries = int(tiles_per_visit), int(max_tries)
        self.allow_upsampling = bool(allow_upsampling)
        self.mask_mpp, self.max_mask_cells = float(mask_mpp), int(max_mask_cells)
        self.transform = transform
        self.max_open_slides, self.max_tissue_indexes = max_open_slides, max_tissue_indexes

        geometry = [self._geometry(t, p) for t, p in zip(self.tables, self.paths, strict=True)]
        self.level0_mpp = np.array([g[0] for g in geometry], np.float64)
        self.level0_size = np.array([g[1:] for g in geometry], np.int64)  # S x 2 (w, h)
        # S x M level-0 side of a tile at each mpp, and which the slide serves
        self.size0 = np.maximum(
            1, np.round(self.tile_px * self.mpps[None] / self.level0_mpp[:, None])
        ).astype(np.int64)
        fits = self.size0 <= self.level0_size.min(1, keepdims=True)
        fine_enough = self.mpps[None] >= self.level0_mpp[:, None] * (1 - MPP_TOLERANCE)
        self.servable = fits & (fine_enough | self.allow_upsampling) & (self.mpp_weights[None] > 0)
        self._mpp_cdf = np.stack([_cdf(self.mpp_weights * row) for row in self.servable])

        weights = self._slide_weights(slide_weights)
        idle = ~self.servable.any(1)
        if idle.any():
            names = ", ".join(self.slide_ids[i] for i in np.flatnonzero(idle)[:5])
            log.warning(
                "online patching: %d slides can serve none of the mpps %s at %d px (e.g. %s): "
                "tiles larger than the slide, or finer than its level 0; they are skipped",
                int(idle.sum()),
                list(self.mpps),
                self.tile_px,
                names,
            )
        self.slide_weights = np.where(idle, 0.0, weights)
        if self.slide_weights.sum() <= 0:
            raise PipelineError(
                f"online patching: none of the {len(self.tables)} slides can serve {self.tile_px}-px "
                f"tiles at mpps {list(self.mpps)} (a tile must fit in the slide and, without "
                "allow_upsampling, not be finer than its level 0); lower tile_px or change mpps."
            )
        self._slide_cdf = _cdf(self.slide_weights)
        self.length = int(sum(len(t) for t in self.tables) if length is None else length)
        self._open: OrderedDict[int, Slide] = OrderedDict()
        self._tissue: OrderedDict[int, TissueIndex] = OrderedDict()

    # -- setup ----------------------------------------------------------------------------
    @staticmethod
    def _validate(mpps, weights, tile_px, min_tissue, seed, length, tiles_per_visit) -> None:
        if not len(mpps) or any(not (m > 0 and math.isfinite(m)) for m in mpps):
            raise ConfigError(f"mpps must be positive um per px values, got {list(mpps)}")
        if len(weights) != len(mpps):
            raise ConfigError(f"{len(weights)} mpp_weights for {len(mpps)} mpps; give one each")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError(f"mpp_weights must be >= 0 with a positive sum, got {weights}")
        if tile_px < 1:
            raise ConfigError(f"tile_px must be positive, got {tile_px}")
        if not 0.0 <= min_tissue <= 1.0:
            raise ConfigError(f"min_tissue must be in [0, 1], got {min_tissue}")
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
        if length is not None and length < 0:
            raise ConfigError(f"length must be >= 0, got {length}")
        if tiles_per_visit < 1:
            raise ConfigError(f"tiles_per_visit must be >= 1, got {tiles_per_visit}")

    @staticmethod
    def _slide_path(table: Coords, slide_id: str, slide_paths: dict) -> Path:
        path = slide_paths.get(slide_id) or table.slide_path
        if not path:
            raise PipelineError(
                f"coords of slide '{slide_id}' do not name their slide; pass slide_paths."
            )
        return Path(path)

    @staticmethod
    def _geometry(table: Coords, path: Path) -> tuple[float, int, int]:
        """Level-0 mpp, width and height: from the coords file, else the slide's header."""
        attrs = table.attrs
        mpp, width, height = (attrs.get(k) for k in ("level0_mpp", "level0_width", "level0_height"))
        if not (mpp and width and height):
            with Slide(path, level0_mpp=mpp) as slide:
                mpp, (width, height) = slide.mpp, slide.dimensions
        return float(mpp), int(width), int(height)

    def _slide_weights(self, slide_weights: str | Sequence[float]) -> np.ndarray:
        n = len(self.tables)
        if isinstance(slide_weights, str):
            if slide_weights == "uniform":
                return np.ones(n)
            if slide_weights == "tissue":  # um^2 of tissue, from the polygons
                areas = [polygons_area(load_tissue_polygons(f)) for f in self.tissue_files]
                return np.asarray(areas, np.float64) * self.level0_mpp**2
            raise ConfigError(
                f"slide_weights '{slide_weights}': use one of {', '.join(SLIDE_WEIGHTINGS)} "
                "or one weight per slide"
            )
        weights = np.asarray(slide_weights, np.float64)
        if weights.shape != (n,) or (weights < 0).any() or not np.isfinite(weights).all():
            raise ConfigError(f"slide_weights: {n} non-negative weights expected, got {weights}")
        return weights

    # -- drawing ------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.length

    def tissue(self, slide: int) -> TissueIndex:
        """Slide ``slide``'s tissue index, built on first use and kept in a small LRU."""
        if slide in self._tissue:
            self._tissue.move_to_end(slide)
            return self._tissue[slide]
        width, height = (int(v) for v in self.level0_size[slide])
        index = TissueIndex.from_geojson(
            self.tissue_files[slide],
            width,
            height,
            float(self.level0_mpp[slide]),
            self.mask_mpp,
            self.max_mask_cells,
        )
        while len(self._tissue) >= max(1, self.max_tissue_indexes):
            self._tissue.popitem(last=False)
        self._tissue[slide] = index
        return index

    def draw(self, index: int) -> PatchLocation:
        """The tile of draw ``index``: a pure function of ``(seed, index)`` (module docstring).
        Any index >= 0 draws: those beyond ``len`` are fresh tiles (a stream that never
        ends, and the redraws of rejected tiles)."""
        if index < 0:
            raise IndexError(f"draw {index}: draws are numbered from 0")
        visit = np.random.default_rng([self.seed, 1, index // self.tiles_per_visit])
        s = _pick(self._slide_cdf, float(visit.random()))
        rng = np.random.default_rng([self.seed, 0, index])
        m = _pick(self._mpp_cdf[s], float(rng.random()))
        size0, mpp = int(self.size0[s, m]), float(self.mpps[m])
        width, height = (int(v) for v in self.level0_size[s])
        tissue = self.tissue(s)
        first = None
        for tries in range(1, self.max_tries + 1):
            if tissue.cells == 0:
                break
            cx, cy = tissue.sample_centre(rng)
            first = first or (cx, cy)
            x0, y0 = round(cx - size0 / 2), round(cy - size0 / 2)
            if x0 < 0 or y0 < 0 or x0 + size0 > width or y0 + size0 > height:
                continue
            share = tissue.tissue_share(x0, y0, size0)
            if share >= self.min_tissue and tissue.in_tissue(x0 + size0 / 2, y0 + size0 / 2):
                return PatchLocation(s, x0, y0, size0, mpp, share, tries, False)
        return self._fallback(s, size0, mpp, first, tissue)

    def _fallback(
        self,
        s: int,
        size0: int,
        mpp: float,
        near: tuple[float, float] | None,
        tissue: TissueIndex,
    ) -> PatchLocation:
        """The tile centred on the grid tile nearest ``near`` (the first candidate), inside
        the slide."""
        width, height = (int(v) for v in self.level0_size[s])
        table = self.tables[s]
        near = near or (width / 2, height / 2)
        if len(table):
            centres = table.coords + table.patch_size_level0 / 2  # N x 2 level-0 (x, y)
            cx, cy = centres[int(np.argmin(((centres - near) ** 2).sum(1)))]
        else:
            cx, cy = near
        x0 = int(np.clip(round(cx - size0 / 2), 0, width - size0))
        y0 = int(np.clip(round(cy - size0 / 2), 0, height - size0))
        share = tissue.tissue_share(x0, y0, size0)
        return PatchLocation(s, x0, y0, size0, mpp, share, self.max_tries, True)

    def locate(self, index: int) -> tuple[int, int, int, int, float]:
        """``(slide, x0, y0, size0, mpp)`` of draw ``index``: level-0 top-left and side of a
        square tile covering ``tile_px`` px at ``mpp``."""
        return self.draw(index).as_tuple()

    # -- reading ------------------------------------------------------------------------
    def slide(self, i: int) -> Slide:
        """Open slide ``i`` (or reuse it); least recently used slides are closed."""
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        while len(self._open) >= max(1, self.max_open_slides):
            self._open.popitem(last=False)[1].close()
        handle = Slide(self.paths[i], level0_mpp=float(self.level0_mpp[i]))
        self._open[i] = handle
        return handle

    def read_location(self, loc: PatchLocation) -> np.ndarray:
        """The tile at ``loc`` as a contiguous ``3 x tile_px x tile_px`` uint8 array."""
        side = (loc.size0, loc.size0)
        return self.slide(loc.slide).read_tile_chw((loc.x0, loc.y0), side, (self.tile_px,) * 2)

    def read(self, index: int) -> np.ndarray:
        """Tile of draw ``index`` as a contiguous ``3 x tile_px x tile_px`` uint8 array."""
        return self.read_location(self.draw(index))

    def __getitem__(self, index: int) -> dict:
        loc = self.draw(index)
        image = torch.from_numpy(self.read_location(loc))  # 3 x tile_px x tile_px uint8
        if self.transform is not None:
            image = self.transform(image)
        return {
            "image": image,
            "coords": torch.tensor([loc.x0, loc.y0], dtype=torch.int64),
            "size0": loc.size0,
            "mpp": loc.mpp,
            "slide": loc.slide,
            "index": index,
        }

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def __getstate__(self) -> dict:  # open slides and tissue indexes stay in their process
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_tissue"] = OrderedDict()
        return state
