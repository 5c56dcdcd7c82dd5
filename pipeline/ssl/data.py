"""Online patching for pretraining: tiles read from slides by coords, multi-crop views, batches.

Tiles are read from the slides as training asks for them (no tile files on disk), in an
order shuffled across all slides, ``tiles_per_visit`` tiles of a slide at a time
(:mod:`pipeline.ssl.stream`); only a few slides are open per worker at a time, so a list
of many thousands of slides costs no memory. Near-white tiles are skipped when read
(replaced by another tile) and repeated tiles (the same slide listed twice, repeated
coords) are dropped up front. The tile order is a pure function of the seed and of the
number of samples already consumed, so a resumed run, on any number of devices or
workers, continues the stream where it stopped. With ``weights`` (``cpath curate``'s
weights.h5) tiles are drawn by their curated weights instead
(:class:`pipeline.ssl.stream.WeightedStream`), as pure a function of the seed. Workers
ship the multi-crop views as uint8; their stain jitter, blur, solarization and
normalisation run on the training device (:mod:`pipeline.ssl.augment`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from pipeline.data.tiles import TileDataset
from pipeline.errors import ConfigError, PipelineError
from pipeline.ssl.augment import DeviceAugment
from pipeline.ssl.config import DataConfig, LossConfig
from pipeline.ssl.masking import batch_masks
from pipeline.ssl.patching import OnlinePatches
from pipeline.ssl.stream import Positions, TileStream, WeightedStream
from pipeline.stain.hsv_filter import HSVFilter
from pipeline.wsi.coords import list_coords_files, read_coords

log = logging.getLogger(__name__)

WHITE = 220  # a pixel is near-white (glass) when all channels exceed this
REDRAW = 1 << 40  # random positions: a replaced tile's draw index is this far on


def background_share(tile: torch.Tensor) -> float:
    """Share of near-white pixels of a ``3 x H x W`` uint8 tile."""
    return float((tile.amin(dim=0) > WHITE).float().mean())


class Dihedral:
    """One of the 8 rotations/flips of the square, uniformly (tissue has no orientation)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(4, ()))
        x = torch.rot90(x, k, dims=(-2, -1))
        return x.flip(-1) if torch.rand(()) < 0.5 else x


class MultiCrop:
    """Two global and ``local_crops`` local views of a ``3 x H x W`` uint8 tile, as uint8:
    DINO's multi-crop (Caron et al., 2021) random resized crops, each turned by one of the
    8 dihedral transforms (tissue has no orientation). The colour augmentations follow on
    the device (:class:`pipeline.ssl.augment.DeviceAugment`)."""

    def __init__(self, cfg: DataConfig):
        self.local_crops = cfg.local_crops

        def views(size: int, scale: tuple[float, float]) -> v2.Compose:
            crop = v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True)
            return v2.Compose([crop, Dihedral()])

        self.global_ = views(cfg.global_size, cfg.global_scale)
        self.local = views(cfg.local_size, cfg.local_scale)

    def __call__(self, tile: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        globals_ = [self.global_(tile), self.global_(tile)]
        return globals_, [self.local(tile) for _ in range(self.local_crops)]


class PretrainTiles(Dataset):
    """Tiles of many slides with multi-crop views: the coords files' grid tiles, or
    positions drawn inside the tissue at several mpps (``positions: random``,
    :class:`pipeline.ssl.patching.OnlinePatches`). Tiles that are mostly glass, or outside
    the HSV tissue range with ``hsv_filter``, are replaced when read (by a fixed rule, so
    the stream stays a function of the seed).

    Items: ``(global views, local views, tiles replaced)``. ``len`` counts the distinct
    grid tiles kept (random positions: the draws of one pass, which never end).
    """

    def __init__(self, cfg: DataConfig, transform: MultiCrop | None = None):
        if cfg.coords is None:
            raise ConfigError(
                "pretraining needs tiles: pass --data.coords OUT/coords "
                "(the coords folder of `cpath preprocess`)"
            )
        files = list_coords_files(cfg.coords)
        tables, kept_files, seen = [], [], set()
        for path in files:
            table = read_coords(path)
            key = (str(Path(table.slide_path or path).resolve()), table.patch_size_level0)
            if key in seen:  # the same slide at the same tile size listed twice
                continue
            seen.add(key)
            tables.append(table)
            kept_files.append(path)
        self.tiles = TileDataset(tables, stain_norm=cfg.stain_norm)
        rng = np.random.default_rng(cfg.seed)
        keep = []
        for s, table in enumerate(self.tiles.tables):
            _, rows = np.unique(table.coords, axis=0, return_index=True)  # repeated coords
            rows = np.sort(rows)
            if cfg.max_tiles_per_slide is not None and len(rows) > cfg.max_tiles_per_slide:
                rows = np.sort(rng.choice(rows, cfg.max_tiles_per_slide, replace=False))
            keep.append(self.tiles.offsets[s] + rows)
        self.items = np.concatenate(keep) if keep else np.zeros(0, np.int64)
        self.slide_sizes = [len(rows) for rows in keep if len(rows)]  # items, slide by slide
        if len(self.items) == 0:
            raise PipelineError(
                f"{cfg.coords}: zero tiles found in {len(files)} coords files; "
                "check the tissue detection of `cpath preprocess`."
            )
        sizes = {t.patch_size for t in self.tiles.tables}
        if cfg.global_size > min(sizes):
            raise ConfigError(
                f"global crops of {cfg.global_size} px are larger than the tiles "
                f"({min(sizes)} px in {cfg.coords}); lower --data.global_size or preprocess "
                "with a larger --patch_size."
            )
        self.slides = len(self.tiles.tables)
        self.item_weights = None  # with cfg.weights: one per item
        if cfg.weights is not None:
            if cfg.positions == "random":
                raise ConfigError(
                    f"--data.weights {cfg.weights} weighs the grid tiles of the coords files; "
                    "it does not apply to --data.positions random: use positions grid"
                )
            self.item_weights = self._item_weights(cfg.weights, kept_files, keep)
        self.transform = transform if transform is not None else MultiCrop(cfg)
        self.max_background = cfg.max_background
        self.hsv = HSVFilter(min_share=cfg.hsv_min_share) if cfg.hsv_filter else None
        self.patches = None
        if cfg.positions == "random":
            target = self.tiles.tables[0].target_mpp
            if cfg.mpps is None and target is None:
                raise ConfigError(
                    f"{cfg.coords}: the coords files give no target mpp; pass --data.mpps"
                )
            self.patches = OnlinePatches(
                kept_files,  # their run's tissue/ folder is found beside them
                mpps=cfg.mpps or [target],
                mpp_weights=cfg.mpp_weights,
                tile_px=cfg.tile_px or min(sizes),
                min_tissue=cfg.min_tissue,
                seed=cfg.seed,
                length=len(self.items),
                slide_weights=cfg.slide_weights,
                tiles_per_visit=cfg.tiles_per_visit,
            )
            if cfg.global_size > self.patches.tile_px:
                raise ConfigError(
                    f"global crops of {cfg.global_size} px are larger than the "
                    f"{self.patches.tile_px}-px tiles; lower --data.global_size or raise "
                    "--data.tile_px"
                )

    def _item_weights(self, path: Path, files: list[Path], keep: list[np.ndarray]) -> np.ndarray:
        """The sampling weight of every item, from ``cpath curate``'s weights.h5, matched by
        slide id and level-0 coords; tiles absent from it get 0 (logged)."""
        from pipeline.curation.store import match_weights

        slides = [s for s, rows in enumerate(keep) if len(rows)]  # as self.slide_sizes
        tables = self.tiles.tables
        ids = [str(tables[s].attrs.get("slide_id") or files[s].stem) for s in slides]
        coords = [tables[s].coords[keep[s] - self.tiles.offsets[s]] for s in slides]
        weights, unmatched = match_weights(Path(path), ids, coords)
        weights = np.concatenate(weights) if weights else np.zeros(0)  # items
        if unmatched:
            log.warning(
                "%s: %d of %d tiles have no sampling weight there and are never drawn",
                path,
                unmatched,
                len(weights),
            )
        if not (weights > 0).any():
            raise PipelineError(
                f"{path}: none of the {len(weights)} tiles of --data.coords has a sampling "
                "weight above 0 there; run `cpath curate` on the features of these coords files"
            )
        return weights

    def __len__(self) -> int:
        return len(self.items)

    def read(self, index: int, attempt: int = 0) -> torch.Tensor:
        """The ``attempt``-th candidate for stream item ``index``: ``3 x H x W`` uint8."""
        if self.patches is not None:  # a draw far beyond any run's positions
            return torch.from_numpy(self.patches.read(index + attempt * REDRAW))
        n = len(self.items)
        return torch.from_numpy(self.tiles.read(int(self.items[(index + attempt * 7919) % n])))

    def keep(self, tile: torch.Tensor) -> bool:
        """Whether a tile is tissue: not mostly glass, and in the HSV range if asked."""
        if background_share(tile) > self.max_background:
            return False
        return self.hsv is None or self.hsv.keep(tile)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        for attempt in range(16):  # replace glass or non-tissue tiles (fixed order)
            tile = self.read(index, attempt)
            if self.keep(tile):
                break
        if self.tiles.stain_norm is not None:
            tile = self.tiles.stain_norm(tile)
        return (*self.transform(tile), attempt)


class TensorTiles(Dataset):
    """In-memory ``N x 3 x H x W`` uint8 tiles cut into the multi-crop views of ``data``: a
    stand-in for :class:`PretrainTiles` (planted tasks, tests) with the same items and the
    attributes :class:`PretrainDataModule` reads, ``slide_sizes`` (consecutive tiles per
    "slide"; default one slide) and ``item_weights`` (sampling weights, or None)."""

    def __init__(
        self,
        tiles: torch.Tensor,
        data: DataConfig,
        slide_sizes: list[int] | None = None,
        weights: np.ndarray | None = None,
    ):
        if slide_sizes is not None and sum(slide_sizes) != len(tiles):
            raise ValueError(f"slides of {sum(slide_sizes)} tiles for {len(tiles)} tiles")
        self.tiles, self.crop = tiles, MultiCrop(data)
        self.slide_sizes = list(slide_sizes) if slide_sizes is not None else [len(tiles)]
        self.item_weights = weights

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.crop(self.tiles[int(index)])


class StreamSampler(Sampler[int]):
    """This rank's share of an endless, seeded stream of tile indices (a
    :class:`pipeline.ssl.stream.TileStream`, or for an int ``n`` one permutation of
    ``range(n)`` per pass).

    Global step ``k`` takes stream positions ``[k * B * world, (k + 1) * B * world)``, rank
    ``r`` the ``r``-th block of ``B`` of them.

    One pass over the sampler is the whole run of ``steps`` steps (one Lightning epoch), so
    that Lightning's in-epoch batch counter, which it restores on resumption, is the global
    step. A resumed run passes the steps already done (``done``) and the samples consumed by
    them (``start``): it yields steps ``done .. steps - 1`` from stream position ``start``, so
    the stream continues exactly, whatever the number of ranks before. ``len`` counts the
    whole run, as Lightning expects.
    """

    def __init__(
        self,
        stream: TileStream | WeightedStream | int,
        batch: int,
        steps: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        start: int = 0,
        done: int = 0,
    ):
        if not 0 <= done <= steps:
            raise ValueError(f"{done} steps done of a run of {steps} steps")
        if isinstance(stream, int):
            stream = TileStream([stream], per_visit=1, seed=seed)
        self.stream, self.batch, self.steps, self.done = stream, batch, steps, done
        self.rank, self.world, self.start = rank, world, start

    def __iter__(self) -> Iterator[int]:
        global_batch = self.batch * self.world
        for step in range(self.steps - self.done):
            base = self.start + step * global_batch + self.rank * self.batch
            yield from self.stream(np.arange(base, base + self.batch)).tolist()

    def __len__(self) -> int:
        return self.steps * self.batch


class Collate:
    """Stack views view-major (all images' view 0, then view 1, ...) and draw iBOT masks."""

    def __init__(self, grid: tuple[int, int], loss: LossConfig):
        self.grid, self.probability, self.ratio = grid, loss.mask_probability, loss.mask_ratio

    def __call__(self, items: list) -> dict[str, torch.Tensor]:
        globals_ = [torch.stack([it[0][v] for it in items]) for v in range(2)]
        n_local = len(items[0][1])
        locals_ = [torch.stack([it[1][v] for it in items]) for v in range(n_local)]
        rng = np.random.default_rng(int(torch.randint(2**31 - 1, ())))
        masks = batch_masks(2 * len(items), self.grid, self.probability, self.ratio, rng)
        return {
            "global": torch.cat(globals_),  # 2B x 3 x G x G
            "local": torch.cat(locals_) if locals_ else torch.zeros(0),  # nB x 3 x L x L
            "masks": torch.from_numpy(masks),  # 2B x N
            "rejected": torch.tensor(sum(it[2] if len(it) > 2 else 0 for it in items)),
        }


class PretrainDataModule(L.LightningDataModule):
    """One long-lived DataLoader over :class:`PretrainTiles` with a :class:`StreamSampler`
    whose one pass is the whole run; a restored run skips the steps it has done and reads
    on from where it stopped (``module.samples_seen``)."""

    def __init__(self, data: DataConfig, loss: LossConfig, patch_size: int, max_steps: int):
        super().__init__()
        self.cfg, self.loss, self.max_steps = data, loss, max_steps
        grid = data.global_size // patch_size
        self.collate = Collate((grid, grid), loss)
        self.augment = DeviceAugment(data)
        self.dataset: PretrainTiles | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = PretrainTiles(self.cfg)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """uint8 crops from the workers, augmented and normalised on the device."""
        return self.augment.batch(batch)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        start = int(getattr(trainer.lightning_module, "samples_seen", 0))
        done = min(trainer.global_step, self.max_steps)
        return self.train_dataloader_for(
            self.max_steps, trainer.global_rank, trainer.world_size, start, done
        )

    def train_dataloader_for(
        self, steps: int, rank: int = 0, world: int = 1, start: int = 0, done: int = 0
    ) -> DataLoader:
        """The loader of a run of ``steps`` batches for ``rank`` of ``world``, the first ``done``
        of them already trained on: it yields the rest, from stream position ``start`` (see
        :class:`StreamSampler`)."""
        if getattr(self.dataset, "patches", None) is not None:
            stream = Positions()  # draws are functions of (seed, position) already
        elif getattr(self.dataset, "item_weights", None) is not None:
            k, seed = self.cfg.tiles_per_visit, self.cfg.seed
            stream = WeightedStream(self.dataset.slide_sizes, self.dataset.item_weights, k, seed)
        else:
            k, seed = self.cfg.tiles_per_visit, self.cfg.seed
            stream = TileStream(self.dataset.slide_sizes, k, seed)
        sampler = StreamSampler(stream, self.cfg.batch_size, steps, rank, world, 0, start, done)
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + start)
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            num_workers=self.cfg.workers,
            collate_fn=self.collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.cfg.workers > 0,
            drop_last=True,
            generator=generator,
            prefetch_factor=4 if self.cfg.workers > 0 else None,
        )
