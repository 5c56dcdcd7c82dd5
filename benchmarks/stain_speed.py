"""Stain normalization: one batched call against a per-tile loop of the same algorithm.

256 real H&E tiles of 224 x 224 px (crops of the CMU skin scan and the carcinoma image,
with flips), each normalizer fitted to the carcinoma image; both ways run on the same
device and the same uint8 tiles, each timed as the best of three runs. Where torchstain
(a test dependency) is installed, its per-tile normalizer of the same method - the
published algorithm as tools run it today - is timed on the same tiles as a second
reference.
Usage: ``python benchmarks/stain_speed.py [--device cuda]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import openslide
import torch
from PIL import Image

from pipeline.data.sources import fetch_all
from pipeline.stain import STAIN_METHODS

ROOT = Path(__file__).resolve().parents[1]


def real_tiles(count: int = 256, size: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    sources = fetch_all(ROOT / "data" / "cache")
    carcinoma = np.array(Image.open(sources["carcinoma"]).convert("RGB"))
    with openslide.OpenSlide(str(sources["cmu"])) as slide:
        skin = np.array(slide.read_region((600, 1000), 0, (1200, 1400)).convert("RGB"))
    rng = np.random.default_rng(0)
    tiles = []
    for i in range(count):
        image = skin if i % 2 else carcinoma
        y, x = rng.integers(0, image.shape[0] - size), rng.integers(0, image.shape[1] - size)
        tile = image[y : y + size, x : x + size]
        tiles.append(np.ascontiguousarray(tile[::-1] if i % 3 == 0 else tile))
    batch = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()  # B x 3 x H x W
    return batch, torch.from_numpy(carcinoma).permute(2, 0, 1).contiguous()


def best_of(fn, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def torchstain_loop(name: str, target: torch.Tensor, tiles: torch.Tensor):
    """A per-tile loop of torchstain's normalizer of ``name`` (None when unavailable)."""
    try:
        from torchstain.torch import normalizers
    except ImportError:
        return None
    classes = {"macenko": "TorchMacenkoNormalizer", "reinhard": "TorchReinhardNormalizer"}
    if name not in classes or tiles.device.type != "cpu":
        return None
    reference = getattr(normalizers, classes[name])()
    reference.fit(target)
    if name == "macenko":
        return lambda: [reference.normalize(t, stains=False) for t in tiles]
    return lambda: [reference.normalize(t) for t in tiles]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    tiles, target = real_tiles()
    tiles = tiles.to(args.device)
    print(
        f"{len(tiles)} tiles of 224 x 224 px on {args.device} ({torch.get_num_threads()} threads)"
    )
    for name, cls in sorted(STAIN_METHODS.items()):
        normalizer = cls().fit(target).to(args.device)
        normalizer(tiles[:8])  # warm-up
        batched = best_of(lambda n=normalizer: n(tiles))
        loop = best_of(lambda n=normalizer: [n(t) for t in tiles])
        per_tile_b, per_tile_l = batched / len(tiles) * 1e3, loop / len(tiles) * 1e3
        line = (
            f"  {name:<9} batched {per_tile_b:6.2f} ms/tile   per-tile loop {per_tile_l:6.2f} "
            f"ms/tile   speed-up {loop / batched:5.2f}x"
        )
        reference = torchstain_loop(name, target, tiles)
        if reference is not None:
            per_tile_r = best_of(reference) / len(tiles) * 1e3
            line += f"   torchstain per tile {per_tile_r:6.2f} ms/tile ({per_tile_r / per_tile_b:5.2f}x)"
        print(line)


if __name__ == "__main__":
    main()
