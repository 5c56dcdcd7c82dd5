"""Pretraining data at cohort scale: multi-crop images/s per worker, 32 slides vs 2,000.

The full worker pipeline of ``cpath pretrain`` (shuffled slide-chunked stream, tile read
from the slide, near-white check, 2 x 224 + 8 x 96 uint8 crops with dihedral turns, the
ViT-B preset's crops) through a DataLoader with ONE worker process, so the figure is
images/s per worker. It runs on the demo cohort's 32 development slides and on a cohort of
2,000 slides (the demo slides under new ids, reached through their own symlinks and coords
files, so each is opened as a slide of its own), with 1 and with ``k`` tiles per slide
visit. Goal: the 2,000-slide rate at least 0.8 of the 32-slide one at the default ``k``.

It also prints:

- the cost on this CPU of the colour augmentations that now run on the device
  (:class:`pipeline.ssl.augment.DeviceAugment`), images/s;
- host memory of the crops in flight per rank at the ViT-B preset (workers x prefetch x
  batch, plus one pinned batch), float32 crops (before) against uint8 (now), computed from
  the preset and checked against the bytes of a real collated batch;
- CPU cores per GPU needed at a GPU step rate you give (``--gpu-rate``, images/s per GPU;
  measure it with ``benchmarks/gpu_check.py``): no figure is assumed.

Usage: ``python benchmarks/ssl_data.py [--batches 12] [--gpu-rate 900]`` (needs ``make
demo``'s ``runs/demo/preprocess``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.ssl.augment import DeviceAugment
from pipeline.ssl.config import DataConfig, LossConfig
from pipeline.ssl.data import PretrainDataModule, PretrainTiles
from pipeline.ssl.pretrain import PretrainConfig
from pipeline.wsi.coords import list_coords_files, read_coords, write_coords

ROOT = Path(__file__).resolve().parents[1]
PREP = ROOT / "runs/demo/preprocess"
CACHE = ROOT / "benchmarks/.cache/ssl_data"
PREFETCH = 4  # PretrainDataModule's prefetch_factor


def development_coords() -> Path:
    """A folder of links to the demo's development coords files (32 slides)."""
    names = (PREP / "development.txt").read_text().split()
    folder = CACHE / "dev32"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = folder / f"{Path(name).stem}.h5"
        if not link.exists():
            link.symlink_to((PREP / "coords" / f"{Path(name).stem}.h5").resolve())
    return folder


def cohort(n: int, source: Path) -> Path:
    """``n`` slides: the source slides under new ids, each behind its own symlink."""
    folder = CACHE / f"cohort{n}"
    coords, slides = folder / "coords", folder / "slides"
    if (folder / "done").exists():
        return coords
    coords.mkdir(parents=True, exist_ok=True)
    slides.mkdir(parents=True, exist_ok=True)
    tables = [read_coords(p) for p in list_coords_files(source)]
    for i in range(n):
        table = tables[i % len(tables)]
        original = Path(table.slide_path)
        link = slides / f"dup_{i:05d}{original.suffix}"
        if not link.exists():
            link.symlink_to(original.resolve())
        attrs = {**table.attrs, "slide_id": f"dup_{i:05d}", "slide_path": str(link)}
        fraction = table.tissue_fraction
        if fraction is None:
            fraction = np.ones(len(table), np.float32)
        write_coords(coords / f"dup_{i:05d}.h5", table.coords, fraction, attrs)
    (folder / "done").write_text("ok\n")
    return coords


def rate(data: DataConfig, batches: int) -> tuple[float, float]:
    """(images/s through one worker process, slide visits per batch) over ``batches``
    batches after two of warm-up."""
    module = PretrainDataModule(data, LossConfig(), patch_size=16, max_steps=batches + 2)
    module.dataset = PretrainTiles(data)
    loader = module.train_dataloader_for(batches + 2)
    sampler = loader.sampler
    indices = np.array(list(iter(sampler)))
    slide_of = np.searchsorted(module.dataset.tiles.offsets, module.dataset.items[indices], "right")
    visits = 1 + np.count_nonzero(np.diff(slide_of.reshape(-1, data.batch_size), axis=1), axis=1)
    it = iter(loader)
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    del it, loader
    return batches * data.batch_size / seconds, float(visits[2:].mean())


def crop_bytes(data: DataConfig, itemsize: int) -> int:
    """Bytes of one image's multi-crop views."""
    pixels = 2 * data.global_size**2 + data.local_crops * data.local_size**2
    return 3 * pixels * itemsize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=str(ROOT / "configs/pretrain/vitb16.yaml"))
    parser.add_argument("--slides", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--per-visit", type=int, default=DataConfig.tiles_per_visit)
    parser.add_argument("--gpu-rate", type=float, default=None, help="images/s per GPU")
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset = load_config(PretrainConfig, args.preset).data
    dev = development_coords()
    big = cohort(args.slides, dev)
    base = replace(
        preset, coords=dev, workers=1, batch_size=args.batch_size, stain_norm=None, seed=0
    )
    tile_px = read_coords(list_coords_files(dev)[0]).patch_size
    print(
        f"worker pipeline at the {Path(args.preset).stem} preset's crops: 2 x "
        f"{preset.global_size} + {preset.local_crops} x {preset.local_size} px from "
        f"{tile_px}-px tiles, 1 worker process, batch {args.batch_size}, "
        f"{args.batches} batches after 2 of warm-up, {args.rounds} interleaved rounds"
    )
    runs: dict[tuple[int, str], list[tuple[float, float]]] = {}
    names = (("32 slides", dev), (f"{args.slides} slides", big))
    for _ in range(args.rounds):  # interleaved rounds: drifts of the machine hit all alike
        for k in sorted({1, args.per_visit}):
            for name, coords in names:
                data = replace(base, coords=coords, tiles_per_visit=k)
                runs.setdefault((k, name), []).append(rate(data, args.batches))
    figures = {}
    for (k, name), values in runs.items():
        images_s = statistics.median(v[0] for v in values)
        figures[(k, name)] = images_s
        print(
            f"  {name:>12}, {k} tile(s) per visit: {images_s:7.1f} images/s per worker "
            f"(median of {len(values)}), {values[0][1]:5.1f} slide visits per batch"
        )
    k = args.per_visit
    ratio = figures[(k, f"{args.slides} slides")] / figures[(k, "32 slides")]
    print(f"  ratio {args.slides} / 32 slides at {k} tiles per visit: {ratio:.2f} (goal >= 0.8)")
    ratio1 = figures[(1, f"{args.slides} slides")] / figures[(1, "32 slides")]
    print(f"  ratio {args.slides} / 32 slides at 1 tile per visit:  {ratio1:.2f}")

    augment = DeviceAugment(preset)
    b = args.batch_size
    crops_g = torch.randint(
        0, 256, (2 * b, 3, preset.global_size, preset.global_size), dtype=torch.uint8
    )
    crops_l = torch.randint(
        0, 256, (preset.local_crops * b, 3, preset.local_size, preset.local_size), dtype=torch.uint8
    )
    batch = {"global": crops_g, "local": crops_l, "masks": torch.zeros(1)}
    augment.batch(batch)
    start = time.perf_counter()
    for _ in range(3):
        augment.batch(batch)
    per_image = (time.perf_counter() - start) / (3 * b)
    print(
        f"  colour augmentations of the crops (now on the device), this CPU, 1 thread: "
        f"{1 / per_image:7.1f} images/s"
    )

    loader = PretrainDataModule(replace(base, workers=0, batch_size=4), LossConfig(), 16, 1)
    loader.dataset = PretrainTiles(replace(base, workers=0))
    real = next(iter(loader.train_dataloader_for(1)))
    measured = sum(v.numel() * v.element_size() for k_, v in real.items() if k_ != "masks") / 4
    assert measured == crop_bytes(preset, 1), (measured, crop_bytes(preset, 1))
    in_flight = preset.workers * PREFETCH * preset.batch_size + preset.batch_size
    before = in_flight * crop_bytes(preset, 4) / 2**30
    after = in_flight * crop_bytes(preset, 1) / 2**30
    print(
        f"  host memory of crops in flight per rank at the preset ({preset.workers} workers x "
        f"{PREFETCH} prefetched batches x {preset.batch_size} + 1 pinned batch = {in_flight} "
        f"images): float32 {before:.2f} GiB before, uint8 {after:.2f} GiB now "
        f"({crop_bytes(preset, 1) / 2**20:.2f} MiB per image, as a real collated batch has)"
    )
    per_worker = figures[(k, f"{args.slides} slides")]
    if args.gpu_rate:
        print(
            f"  CPU cores (worker processes) per GPU at {args.gpu_rate:.0f} images/s per GPU: "
            f"{args.gpu_rate / per_worker:.1f}"
        )
    else:
        print(
            f"  CPU cores per GPU = GPU images/s / {per_worker:.1f} (pass --gpu-rate, measured "
            "with benchmarks/gpu_check.py; no rate is assumed here)"
        )
    print(f"  ({os.cpu_count()} CPUs here)")


if __name__ == "__main__":
    main()
