"""Tile reading: the tile dataset against a bare OpenSlide ``read_region`` loop.

Both read the same tiles of the demo cohort (coords at 0.5 mpp, 256 px) in the same
order, from the same pyramid level and region size; the reference does nothing else
(no RGB conversion, no resampling, no tensor). Reported per slide resolution: 20x
slides (tiles read 1:1 from level 0) and 40x slides (512 level-0 px resized to 256).
Then the dataset through a DataLoader with 1 and 2 worker processes.

Usage: ``python benchmarks/tile_reading.py [--tiles 1500]`` (needs ``make demo`` first)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import openslide
import torch
from torch.utils.data import DataLoader, Subset

from pipeline.data.tiles import TileDataset
from pipeline.wsi.coords import read_coords
from pipeline.wsi.preprocess import PreprocessConfig, preprocess

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(dataset: TileDataset, indices: np.ndarray) -> float:
    """Tiles/s of ``openslide.read_region`` alone, slides opened once."""
    handles: dict[int, openslide.OpenSlide] = {}
    plans = []
    for i in indices:
        s, row = dataset.locate(int(i))
        table = dataset.tables[s]
        slide = dataset.slide(s)  # only to look up the level the dataset reads from
        size0, size = table.patch_size_level0, table.patch_size
        level = slide.best_level(size0 / size)
        side = max(1, round(size0 / slide.level_downsamples[level]))
        plans.append((s, tuple(int(v) for v in table.coords[row]), level, side))
    for s in {p[0] for p in plans}:
        handles[s] = openslide.OpenSlide(str(dataset.paths[s]))
    start = time.perf_counter()
    for s, xy, level, side in plans:
        handles[s].read_region(xy, level, (side, side))
    elapsed = time.perf_counter() - start
    for h in handles.values():
        h.close()
    return len(plans) / elapsed


def dataset_loop(dataset: TileDataset, indices: np.ndarray) -> float:
    for i in indices[:8]:  # open the slides first, as the bare loop does
        dataset[int(i)]
    start = time.perf_counter()
    for i in indices:
        dataset[int(i)]
    return len(indices) / (time.perf_counter() - start)


def loader_rate(dataset: TileDataset, indices: np.ndarray, workers: int) -> float:
    loader = DataLoader(
        Subset(dataset, indices.tolist()),
        batch_size=64,
        num_workers=workers,
        persistent_workers=False,
    )
    it = iter(loader)
    next(it)  # worker start-up is not tile reading
    start, count = time.perf_counter(), 0
    for batch in it:
        count += len(batch["image"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=ROOT / "data" / "demo")
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "bench" / "prep-demo")
    parser.add_argument("--tiles", type=int, default=1500)
    args = parser.parse_args()
    if not (args.demo / "slides").exists():
        raise SystemExit(f"no demo cohort at {args.demo}: run `make demo` first")
    preprocess(
        PreprocessConfig(slides=str(args.demo / "slides"), out=args.out, workers=2), progress=False
    )
    files = sorted((args.out / "coords").glob("*.h5"))
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    for label, keep in (
        ("20x slides (1:1 from level 0)", lambda m: m > 0.4),
        ("40x slides (512 -> 256 px)", lambda m: m < 0.3),
    ):
        chosen = [f for f in files if keep(read_coords(f).attrs["level0_mpp"])]
        dataset = TileDataset(chosen)
        indices = np.sort(rng.choice(len(dataset), min(args.tiles, len(dataset)), replace=False))
        indices = np.resize(indices, args.tiles)  # small sets are read several times over
        bare_loop(dataset, indices)  # warm the OS file cache for both
        rounds = [(bare_loop(dataset, indices), dataset_loop(dataset, indices)) for _ in range(5)]
        bare, ours = np.median([r[0] for r in rounds]), np.median([r[1] for r in rounds])
        ratio = np.median([r[1] / r[0] for r in rounds])  # each round: both back to back
        print(f"{label}: {len(chosen)} slides, {len(indices)} tiles in slide order")
        print(f"  bare read_region: {bare:7.0f} tiles/s")
        print(f"  TileDataset:      {ours:7.0f} tiles/s   ratio {ratio:.2f} (median of 5 rounds)")
        shuffled = rng.permutation(indices)
        rounds = [(bare_loop(dataset, shuffled), dataset_loop(dataset, shuffled)) for _ in range(5)]
        print(
            f"  shuffled across slides: TileDataset {np.median([r[1] for r in rounds]):.0f} "
            f"tiles/s, bare {np.median([r[0] for r in rounds]):.0f}, ratio "
            f"{np.median([r[1] / r[0] for r in rounds]):.2f}"
        )
        for workers in (1, 2):
            rate = loader_rate(dataset, indices, workers)
            print(
                f"  DataLoader, {workers} worker(s), batch 64: {rate:7.0f} tiles/s "
                f"({rate / bare:.2f}x the bare loop)"
            )
        dataset.close()


if __name__ == "__main__":
    main()
