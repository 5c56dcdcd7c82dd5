"""Online patching for pretraining: tiles read from slides by coords, multi-crop views, batches.

Tiles are read from the slides as training asks for them (no tile files on disk), in an
order shuffled across all slides; only a few slides are open per worker at a time, so a
list of many thousands of slides costs no memory. Near-white tiles are skipped when read
(replaced by another tile) and repeated tiles (the same slide listed twice, repeated
coords) are dropped up front. The tile order is a pure function of the seed and of the
number of samples already consumed, so a resumed run, on any number of devices,
continues the stream where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from pipeline.data.tiles import TileDataset
from pipeline.errors import ConfigError, PipelineError
from pipeline.ssl.config import DataConfig, LossConfig
from pipeline.ssl.masking import batch_masks
from pipeline.stain.augment import HEDJitter, HSVJitter
from pipeline.wsi.coords import list_coords_files, read_coords

WHITE = 220  # a pixel is near-white (glass) when all channels exceed this


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
    """Two global and ``local_crops`` local views of a ``3 x H x W`` uint8 tile (DINO's
    multi-crop, Caron et al., 2021, with pathology augmentations: dihedral rotations,
    HED/HSV stain jitter, blur; solarization off by default)."""

    def __init__(self, cfg: DataConfig):
        self.local_crops = cfg.local_crops
        stain = []
        if cfg.stain_augment:
            stain = [
                HEDJitter(cfg.hed_sigma, cfg.hed_bias),
                HSVJitter(cfg.hsv_hue, cfg.hsv_saturation, cfg.hsv_value),
            ]
        blur = [v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=cfg.blur)]
        tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]

        def views(size: int, scale: tuple[float, float], extra: list) -> v2.Compose:
            crop = v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True)
            return v2.Compose([crop, Dihedral(), *stain, *blur, *extra, *tail])

        self.global1 = views(cfg.global_size, cfg.global_scale, [])
        solar = [v2.RandomSolarize(128, p=cfg.solarize)] if cfg.solarize > 0 else []
        self.global2 = views(cfg.global_size, cfg.global_scale, solar)
        self.local = views(cfg.local_size, cfg.local_scale, [])

    def __call__(self, tile: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        globals_ = [self.global1(tile), self.global2(tile)]
        return globals_, [self.local(tile) for _ in range(self.local_crops)]


class PretrainTiles(Dataset):
    """Tiles of many slides with multi-crop views; near-white tiles are replaced when read.

    Items: ``(global views, local views)``. ``len`` counts the distinct tiles kept.
    """

    def __init__(self, cfg: DataConfig, transform: MultiCrop | None = None):
        if cfg.coords is None:
            raise ConfigError(
                "pretraining needs tiles: pass --data.coords OUT/coords "
                "(the coords folder of `cpath preprocess`)"
            )
        files = list_coords_files(cfg.coords)
        tables, seen = [], set()
        for path in files:
            table = read_coords(path)
            key = (str(Path(table.slide_path or path).resolve()), table.patch_size_level0)
            if key in seen:  # the same slide at the same tile size listed twice
                continue
            seen.add(key)
            tables.append(table)
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
        self.transform = transform if transform is not None else MultiCrop(cfg)
        self.max_background = cfg.max_background

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        n = len(self.items)
        for attempt in range(16):  # replace near-white tiles by other tiles (fixed order)
            tile = torch.from_numpy(self.tiles.read(int(self.items[(index + attempt * 7919) % n])))
            if background_share(tile) <= self.max_background:
                break
        if self.tiles.stain_norm is not None:
            tile = self.tiles.stain_norm(tile)
        return self.transform(tile)


class StreamSampler(Sampler[int]):
    """This rank's share of an endless, seeded stream of tile indices.

    The stream is the concatenation of permutations of ``range(n)`` (one per pass,
    seeded by ``seed + pass``). Global step ``k`` takes stream positions
    ``[k * B * world, (k + 1) * B * world)``, rank ``r`` the ``r``-th block of ``B`` of them.

    One pass over the sampler is the whole run of ``steps`` steps (one Lightning epoch), so
    that Lightning's in-epoch batch counter, which it restores on resumption, is the global
    step. A resumed run passes the steps already done (``done``) and the samples consumed by
    them (``start``): it yields steps ``done .. steps - 1`` from stream position ``start``, so
    the stream continues exactly, whatever the number of ranks before. ``len`` counts the
    whole run, as Lightning expects.
    """

    def __init__(
        self,
        n: int,
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
        self.n, self.batch, self.steps, self.done = n, batch, steps, done
        self.rank, self.world, self.seed, self.start = rank, world, seed, start
        self._pass, self._perm = -1, None

    def position(self, p: int) -> int:
        pass_, offset = divmod(p, self.n)
        if pass_ != self._pass:
            g = torch.Generator().manual_seed(self.seed + pass_)
            self._pass, self._perm = pass_, torch.randperm(self.n, generator=g)
        return int(self._perm[offset])

    def __iter__(self) -> Iterator[int]:
        global_batch = self.batch * self.world
        for step in range(self.steps - self.done):
            base = self.start + step * global_batch + self.rank * self.batch
            for j in range(self.batch):
                yield self.position(base + j)

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
        self.dataset: PretrainTiles | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is None:
            self.dataset = PretrainTiles(self.cfg)

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
        sampler = StreamSampler(
            len(self.dataset), self.cfg.batch_size, steps, rank, world, self.cfg.seed, start, done
        )
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
