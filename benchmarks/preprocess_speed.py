"""Preprocessing speed and memory on large slides.

1. A 30000 x 20000 px slide at 0.25 mpp quilted from the real demo textures: time of
   tissue detection + coords (thumbnail read, detection, grid) and of the whole
   per-slide job (plus GeoJSON, QC image, coords file), against one bare
   ``read_region`` of the detection level as the I/O reference.
2. A 100000 x 100000 px sparse slide (precompressed JPEG tiles): peak memory of the
   same job above the interpreter's baseline, which must stay set by the thumbnail.

Each measurement runs in a fresh process; its peak resident memory (VmHWM, reset after
the imports through /proc/self/clear_refs) belongs to the measured work alone.
Usage: ``python benchmarks/preprocess_speed.py [--out data/bench]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_large_slide(path: Path) -> None:
    """30000 x 20000 px at 0.25 mpp from the real textures (the demo generator)."""
    from pipeline.data.demo import SlidePlan, generate_slide, load_textures

    plan = SlidePlan("bench_30k", "bench", "tumor", "C", 0.25, 40, 7500.0, 5000.0, seed=7)
    record = generate_slide(plan, load_textures(ROOT / "data" / "cache"), path.parent.parent)
    assert (path.parent.parent / record["path"]).resolve() == path.resolve()


def make_huge_slide(path: Path, side: int = 100_000, mpp: float = 0.25) -> None:
    """A ``side`` x ``side`` px Aperio-style slide written from precompressed tiles.

    A disk of real carcinoma texture (a third of the width across) on glass; every
    tile is JPEG-encoded once and reused, so writing takes seconds.
    """
    import imagecodecs
    import tifffile
    from PIL import Image

    from pipeline.data.sources import fetch_source
    from pipeline.wsi.writer import aperio_description

    texture = np.asarray(
        Image.open(fetch_source("carcinoma", ROOT / "data" / "cache")).convert("RGB")
    )
    tile = 512
    glass = imagecodecs.jpeg_encode(np.full((tile, tile, 3), 242, np.uint8), level=90)
    patches = [
        imagecodecs.jpeg_encode(np.ascontiguousarray(texture[y : y + tile, x : x + tile]), level=90)
        for y in (0, 488)
        for x in (0, 488)
    ]

    def tiles(size: int):
        n = -(-size // tile)
        centre, radius = n / 2, n / 6
        for ty in range(n):
            for tx in range(n):
                inside = (ty + 0.5 - centre) ** 2 + (tx + 0.5 - centre) ** 2 < radius**2
                yield patches[(tx + ty) % len(patches)] if inside else glass

    sizes = [side]
    while sizes[-1] // 4 >= 1024:
        sizes.append(-(-sizes[-1] // 4))
    common = {
        "dtype": np.uint8,
        "tile": (tile, tile),
        "compression": "jpeg",
        "photometric": "rgb",
        "metadata": None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        desc = aperio_description(side, side, mpp, 40, tile)
        tif.write(tiles(side), shape=(side, side, 3), description=desc, **common)
        thumb = np.full((256, 256, 3), 242, np.uint8)
        tif.write(
            thumb,
            description="Aperio Image Library v12.0.15 \r\nthumbnail",
            photometric="rgb",
            metadata=None,
        )
        for size in sizes[1:]:
            tif.write(tiles(size), shape=(size, size, 3), subfiletype=1, **common)


def peak_rss() -> float:
    """Peak resident memory of this process in MiB (Linux VmHWM)."""
    status = Path("/proc/self/status").read_text()
    return (
        int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
        / 1024
    )


def reset_peak_rss() -> float:
    """Reset the peak to the current resident memory; returns it in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return peak_rss()


def measure(slide: str, out: str) -> dict:
    """Runs in a child process: time the stages of one slide and its peak RSS."""
    from pipeline.wsi.preprocess import PreprocessConfig, process_slide
    from pipeline.wsi.reader import Slide
    from pipeline.wsi.slides import SlideEntry
    from pipeline.wsi.tiling import tile_grid
    from pipeline.wsi.tissue import TissueConfig, make_tissue_detector

    base = reset_peak_rss()  # MiB after imports
    cfg = PreprocessConfig(slides=slide, out=Path(out), tile_size=256)
    detect = make_tissue_detector(TissueConfig())
    with Slide(slide) as s:
        t0 = time.perf_counter()
        thumb = s.thumbnail_at_mpp(8.0)
        t1 = time.perf_counter()
        mask = detect(thumb, s.mpp * s.dimensions[0] / thumb.shape[1])
        t2 = time.perf_counter()
        grid = tile_grid(s.dimensions, s.mpp, 0.5, 256, 0, mask, 0.5)
        t3 = time.perf_counter()
        level = s.best_level(8.0 / s.mpp)
        w, h = s.level_dimensions[level]
        t4 = time.perf_counter()
        for y in range(0, h, 4096):  # bare reads of the same level, same chunks
            for x in range(0, w, 4096):
                s._handle.read_region(
                    (round(x * s.level_downsamples[level]), round(y * s.level_downsamples[level])),
                    level,
                    (min(4096, w - x), min(4096, h - y)),
                )
        t5 = time.perf_counter()
        size = s.dimensions
    t6 = time.perf_counter()
    row = process_slide(SlideEntry(Path(slide).stem, Path(slide)), cfg)
    t7 = time.perf_counter()
    peak = peak_rss()
    return {
        "size": size,
        "tiles": len(grid.coords),
        "thumbnail": thumb.shape[:2],
        "read_s": t1 - t0,
        "detect_s": t2 - t1,
        "grid_s": t3 - t2,
        "bare_read_s": t5 - t4,
        "job_s": t7 - t6,
        "status": row["status"],
        "peak_mib_above_baseline": peak - base,
        "baseline_mib": base,
    }


def run_child(slide: Path, out: Path) -> dict:
    code = f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.preprocess_speed import measure; print(json.dumps(measure({str(slide)!r}, {str(out)!r})))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "bench")
    args = parser.parse_args()
    large = args.out / "slides" / "bench_30k.svs"
    huge = args.out / "slides" / "bench_100k.svs"
    if not large.exists():
        t = time.perf_counter()
        make_large_slide(large)
        print(f"made {large} in {time.perf_counter() - t:.0f} s")
    if not huge.exists():
        t = time.perf_counter()
        make_huge_slide(huge)
        print(f"made {huge} in {time.perf_counter() - t:.0f} s")

    for name, path in (
        ("30000 x 20000 px, 0.25 mpp", large),
        ("100000 x 100000 px, 0.25 mpp", huge),
    ):
        with tempfile.TemporaryDirectory() as out:
            r = run_child(path, Path(out))
        work = r["read_s"] + r["detect_s"] + r["grid_s"]
        print(
            f"\n{name}: {r['tiles']} tiles at 0.5 mpp, thumbnail {r['thumbnail'][1]}x{r['thumbnail'][0]} px"
        )
        print(
            f"  tissue detection + coords: {work:.3f} s (thumbnail read {r['read_s']:.3f} s, "
            f"detection {r['detect_s']:.3f} s, grid {r['grid_s']:.4f} s)"
        )
        print(
            f"  bare read_region of the same level: {r['bare_read_s']:.3f} s -> "
            f"detection + coords / bare read = {work / r['bare_read_s']:.2f}x"
        )
        print(f"  whole per-slide job (with GeoJSON, QC image, coords file): {r['job_s']:.3f} s")
        print(
            f"  peak memory above the interpreter baseline: {r['peak_mib_above_baseline']:.0f} MiB "
            f"(baseline {r['baseline_mib']:.0f} MiB; thumbnail {np.prod(r['thumbnail']) * 3 / 2**20:.0f} MiB)"
        )


if __name__ == "__main__":
    main()
