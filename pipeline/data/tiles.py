"""Tiles read from slides by their coords files: a torch ``Dataset`` for pretraining and extraction.

Every item is one tile at its coords file's target resolution, RGB uint8 ``3 x H x W``.
Slides are opened lazily, at most once per worker process, and kept in a small
least-recently-used cache, so a dataset over thousands of slides holds only a few
open at a time and never any pixel data between items.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.errors import PipelineError
from pipeline.stain.base import StainNormalizer, load_normalizer
from pipeline.wsi.coords import Coords, read_coords
from pipeline.wsi.reader import Slide


class TileDataset(Dataset):
    """Tiles of one or many slides, in coords-file order.

    Args:
        coords: coords files (or already-read :class:`Coords`), one per slide.
        slide_paths: optional ``{slide_id: path}`` for slides that moved since preprocessing;
            by default each coords file's ``slide_path`` attribute is used.
        transform: applied to each ``3 x H x W`` uint8 tensor.
        max_open_slides: slides kept open per process.
        stain_norm: a fitted stain normalizer, or its JSON file (``cpath stain --action fit``),
            applied to each tile before ``transform``.

    Items are dicts: ``image`` (tensor), ``coords`` (level-0 x, y), ``slide`` (index into
    ``coords``) and ``index`` (row in that slide's coords file).
    """

    def __init__(
        self,
        coords: Sequence[str | os.PathLike | Coords] | str | os.PathLike,
        slide_paths: dict[str, str | os.PathLike] | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        max_open_slides: int = 64,
        stain_norm: str | os.PathLike | StainNormalizer | None = None,
    ):
        if isinstance(coords, str | os.PathLike):
            coords = [coords]
        self.tables = [c if isinstance(c, Coords) else read_coords(c) for c in coords]
        self.paths = [self._slide_path(t, slide_paths or {}) for t in self.tables]
        self.level0_mpp = [t.attrs.get("level0_mpp") for t in self.tables]
        self.offsets = np.cumsum([0] + [len(t) for t in self.tables])
        self.transform = transform
        if stain_norm is not None and not isinstance(stain_norm, StainNormalizer):
            stain_norm = load_normalizer(stain_norm)
        self.stain_norm = stain_norm
        self.max_open_slides = max_open_slides
        self._open: OrderedDict[int, Slide] = OrderedDict()

    @staticmethod
    def _slide_path(table: Coords, slide_paths: dict) -> Path:
        slide_id = table.attrs.get("slide_id") or table.attrs.get("name")
        path = slide_paths.get(slide_id) or table.slide_path
        if not path:
            raise PipelineError(
                f"coords of slide '{slide_id}' do not name their slide; pass slide_paths."
            )
        return Path(path)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(slide, row)`` of dataset item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"tile {index} out of range for {len(self)} tiles")
        slide = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return slide, index - int(self.offsets[slide])

    def slide(self, i: int) -> Slide:
        """Open slide ``i`` (or reuse it); least recently used slides are closed."""
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        if len(self._open) >= self.max_open_slides:
            self._open.popitem(last=False)[1].close()
        handle = Slide(self.paths[i], level0_mpp=self.level0_mpp[i])
        self._open[i] = handle
        return handle

    def read(self, index: int) -> np.ndarray:
        """Tile ``index`` as a contiguous ``3 x H x W`` uint8 array."""
        s, row = self.locate(index)
        table = self.tables[s]
        x, y = (int(v) for v in table.coords[row])
        size0, size = table.patch_size_level0, table.patch_size
        return self.slide(s).read_tile_chw((x, y), (size0, size0), (size, size))

    def __getitem__(self, index: int) -> dict:
        s, row = self.locate(index)
        image = torch.from_numpy(self.read(index))  # 3 x H x W uint8
        if self.stain_norm is not None:
            image = self.stain_norm(image)
        if self.transform is not None:
            image = self.transform(image)
        coords = torch.from_numpy(self.tables[s].coords[row].copy())
        return {"image": image, "coords": coords, "slide": s, "index": row}

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def __getstate__(self) -> dict:  # open slides stay in their process
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state
