"""Preprocessing speed and memory on large slides, side by side with hs2p.

1. A 30000 x 20000 px slide at 0.25 mpp quilted from the real demo textures, and one
   with a green pen stroke beside its tissue: time of the per-slide work in memory
   (open, read the detection level, detect tissue, lay the grid) and of the whole
   per-slide job with its files, each part of it timed (GeoJSON outlines, QC image,
   coords file), against a bare open + ``read_region`` of the detection level as the
   I/O reference.
2. A 100000 x 100000 px sparse slide (precompressed JPEG tiles): the same, and the peak
   memory of the job above the interpreter's baseline, which must stay set by the
   thumbnail.

Times are steady state: one warm-up, then the median of ``--repeats`` runs in the same
process (start-up excluded; each whole job writes into a fresh folder). Each slide is
measured in a fresh process; its peak resident memory (VmHWM, reset after the imports
through /proc/self/clear_refs) belongs to the measured work alone.

With ``--hs2p`` the open-source tiler hs2p 6.1.0 tiles the same slides with the same
parameters (256 px at 0.5 mpp, minimum tissue 0.5, segmentation on the level nearest
16 um/px), in its own virtual environment (``data/bench/hs2p-venv``, made on first use
from the package registry; hs2p is never a dependency of ``pipeline``), through
``benchmarks/hs2p_child.py``. Printed for both: steady-state time, tile count, the
overlap of the areas the two tile sets cover, and (on the 30k slides, which have a ground
truth) the tiles on pen ink.

``cpath --help`` start-up is timed too (median of 3 fresh processes), with ``import
torch`` for scale.

Usage: ``python benchmarks/preprocess_speed.py [--out data/bench] [--repeats 5] [--hs2p]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_large_slide(path: Path, seed: int = 7) -> None:
    """30000 x 20000 px at 0.25 mpp from the real textures (the demo generator); seed 7
    draws no pen stroke, seed 44 a green one beside the tissue."""
    from pipeline.data.demo import DEVELOPMENT, SlidePlan, generate_slide, load_textures

    plan = SlidePlan(
        path.stem,
        "bench",
        "tumor",
        DEVELOPMENT,
        "cmu",
        "carcinoma",
        "C",
        0.25,
        40,
        7500.0,
        5000.0,
        seed=seed,
    )
    record = generate_slide(plan, load_textures(ROOT / "data" / "cache"), path.parent.parent)
    assert (path.parent.parent / record["path"]).resolve() == path.resolve()


def make_huge_slide(path: Path, side: int = 100_000, mpp: float = 0.25) -> None:
    """A ``side`` x ``side`` px Aperio-style slide written from precompressed tiles.

    A disk of real carcinoma texture (a third of the width across, made of whole level-0
    tiles) on glass; every level-0 tile is JPEG-encoded once and reused, so writing takes
    seconds. The reduced levels show the same disk: each of their pixels is texture (the
    texture downsampled to the level) where its level-0 tile is, glass elsewhere.
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
    n0 = -(-side // tile)  # level-0 tiles per side
    centre, radius = n0 / 2, n0 / 6

    def inside(t: np.ndarray, u: np.ndarray) -> np.ndarray:  # level-0 tile indices
        return (t + 0.5 - centre) ** 2 + (u + 0.5 - centre) ** 2 < radius**2

    glass_px = np.full((tile, tile, 3), 242, np.uint8)
    glass = imagecodecs.jpeg_encode(glass_px, level=90)
    patches = [
        imagecodecs.jpeg_encode(np.ascontiguousarray(texture[y : y + tile, x : x + tile]), level=90)
        for y in (0, 488)
        for x in (0, 488)
    ]

    def tiles(size: int):
        n = -(-size // tile)
        if size == side:
            for ty in range(n):
                for tx in range(n):
                    yield patches[(tx + ty) % len(patches)] if inside(ty, tx) else glass
            return
        ds = side / size
        small = Image.fromarray(texture)
        small = np.asarray(small.resize((max(8, round(small.width / ds)),) * 2))
        reps = -(-tile // small.shape[0])
        textured = np.tile(small, (reps, reps, 1))[:tile, :tile]  # tile x tile x 3
        for ty in range(n):
            for tx in range(n):
                rows = ((ty * tile + np.arange(tile)) * ds // tile).astype(int)  # level-0 tiles
                cols = ((tx * tile + np.arange(tile)) * ds // tile).astype(int)
                mask = inside(rows[:, None], cols[None, :])
                if not mask.any():
                    yield glass
                else:
                    image = np.where(mask[..., None], textured, glass_px)
                    yield imagecodecs.jpeg_encode(np.ascontiguousarray(image), level=90)

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


def _median_time(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up; and its result."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _alternating_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each of ``fns`` called in turn ``repeats`` times after one warm-up
    each, so that a slower spell of the machine falls on all of them."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def measure(slide: str, out: str, repeats: int = 5, parts: bool = True) -> dict:
    """Runs in a child process: steady-state time of the whole per-slide job, and (with
    ``parts``) of each part of it and of the bare read, and the peak RSS.

    The slide is opened afresh for every read, as every per-slide job must: OpenSlide's
    tile cache belongs to the open slide, so every job decodes its tiles anew.
    """
    import openslide

    from pipeline.wsi.contours import mask_polygons, polygons_to_geojson
    from pipeline.wsi.coords import read_coords, write_coords
    from pipeline.wsi.preprocess import (
        PreprocessConfig,
        draw_qc,
        process_slide,
        tile_slide,
        write_jpeg,
    )
    from pipeline.wsi.reader import Slide
    from pipeline.wsi.slides import SlideEntry
    from pipeline.wsi.tiling import tile_grid
    from pipeline.wsi.tissue import make_tissue_detector

    base = reset_peak_rss()  # MiB after imports
    entry = SlideEntry(Path(slide).stem, Path(slide))
    runs = iter(range(repeats + 1))
    rows = []

    def job() -> None:  # a fresh output folder each time: nothing is skipped
        c = PreprocessConfig(slides=slide, out=Path(out) / f"run{next(runs)}", tile_size=256)
        rows.append(process_slide(entry, c))

    def in_memory() -> None:  # the same work, no file written
        tile_slide(entry, PreprocessConfig(slides=slide, out=Path(out), tile_size=256))

    times = _alternating_medians({"job_s": job, "memory_s": in_memory}, repeats)
    done = read_coords(Path(out) / f"run{repeats}" / "coords" / f"{Path(slide).stem}.h5")
    result = {
        "size": [done.attrs["level0_width"], done.attrs["level0_height"]],
        "tiles": len(done),
        "status": rows[-1]["status"],
        "coords": done.coords.tolist(),
        "tile_size_level0": int(done.patch_size_level0),
        "peak_mib_above_baseline": peak_rss() - base,
        "baseline_mib": base,
    }
    if not parts:
        return {**times, **result}

    cfg = PreprocessConfig(slides=slide, out=Path(out), tile_size=256)
    detect = make_tissue_detector(cfg.tissue)

    def read() -> np.ndarray:
        with Slide(slide) as s:
            return s.detection_thumbnail(cfg.tissue.mpp)

    with Slide(slide) as s:
        size, level0_mpp = s.dimensions, s.mpp
        level = s.best_level(1.25 * cfg.tissue.mpp / s.mpp)  # as detection_thumbnail
        w, h = s.level_dimensions[level]
        ds = s.level_downsamples[level]

    def bare_read() -> None:  # open, and read the same level in the same chunks
        handle = openslide.OpenSlide(slide)
        for y in range(0, h, 4096):
            for x in range(0, w, 4096):
                handle.read_region(
                    (round(x * ds), round(y * ds)), level, (min(4096, w - x), min(4096, h - y))
                )
        handle.close()

    times.update(_alternating_medians({"read_s": read, "bare_read_s": bare_read}, repeats))
    thumb = read()
    mpp = level0_mpp * size[0] / thumb.shape[1]
    times["detect_s"], mask = _median_time(lambda: detect(thumb, mpp), repeats)
    times["grid_s"], grid = _median_time(
        lambda: tile_grid(size, level0_mpp, 0.5, 256, 0, mask, 0.5), repeats
    )
    scale = thumb.shape[1] / size[0]
    times["polygons_s"], polygons = _median_time(lambda: mask_polygons(mask), repeats)
    times["geojson_s"], _ = _median_time(
        lambda: json.dumps(polygons_to_geojson(polygons, (1 / scale, 1 / scale))), repeats
    )

    def qc() -> None:
        image = draw_qc(thumb, polygons, grid.coords, grid.patch_size_level0, scale, 1024)
        write_jpeg(Path(out) / "qc_bench.jpg", image)

    times["qc_s"], _ = _median_time(qc, repeats)
    h5 = Path(out) / "coords_bench.h5"
    times["coords_write_s"], _ = _median_time(  # with the attributes of the job's file
        lambda: write_coords(h5, grid.coords, grid.tissue_fraction, done.attrs), repeats
    )

    return {**times, **result, "thumbnail": thumb.shape[:2]}


def run_child(slide: Path, out: Path, repeats: int, parts: bool = True) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); "
        "from benchmarks.preprocess_speed import measure; "
        f"print(json.dumps(measure({str(slide)!r}, {str(out)!r}, {repeats}, {parts})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


HS2P = "hs2p[openslide]==6.1.0"


def hs2p_python(venv: Path) -> Path:
    """The hs2p environment's interpreter, made on first use (from the package registry)."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making {venv} with {HS2P} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", HS2P], check=True)
    return python


def run_hs2p(python: Path, slide: Path, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "hs2p.json"
        subprocess.run(
            [str(python), str(ROOT / "benchmarks" / "hs2p_child.py"), str(slide), str(out)]
            + ["--repeats", str(repeats)],
            check=True,
            capture_output=True,
            text=True,
        )
        return json.loads(out.read_text())


def coverage(coords: list, side: int, size: tuple[int, int], cell: int = 64) -> np.ndarray:
    """Boolean ``cell``-px grid of the level-0 area that the tiles cover."""
    grid = np.zeros((-(-size[1] // cell), -(-size[0] // cell)), bool)
    for x, y in coords:
        grid[y // cell : -(-(y + side) // cell), x // cell : -(-(x + side) // cell)] = True
    return grid


def pen_tiles(coords: list, side: int, pen: np.ndarray, ds: int, share: float = 0.25) -> int:
    """Tiles at least ``share`` pen ink in the ground-truth pen mask (``ds`` level-0 px per
    mask px)."""
    n = 0
    for x, y in coords:
        box = pen[y // ds : -(-(y + side) // ds), x // ds : -(-(x + side) // ds)]
        n += bool(box.size) and box.mean() >= share
    return n


def startup() -> tuple[float, float]:
    """Median seconds of ``cpath --help`` and of ``import torch``, fresh processes."""

    def timed(args: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *args], capture_output=True, check=True)
        return time.perf_counter() - t0

    help_s = statistics.median(timed(["-m", "pipeline", "--help"]) for _ in range(3))
    torch_s = statistics.median(timed(["-c", "import torch"]) for _ in range(3))
    return help_s, torch_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "bench")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per slide")
    parser.add_argument("--hs2p", action="store_true", help="run hs2p side by side")
    parser.add_argument("--hs2p-venv", type=Path, default=ROOT / "data" / "bench" / "hs2p-venv")
    args = parser.parse_args()
    large = args.out / "slides" / "bench_30k.svs"
    inked = args.out / "slides" / "bench_30k_pen.svs"
    huge = args.out / "slides" / "bench_100k.svs"
    for path, seed in ((large, 7), (inked, 44)):
        if not path.exists():
            t = time.perf_counter()
            make_large_slide(path, seed)
            print(f"made {path} in {time.perf_counter() - t:.0f} s")
    if not huge.exists():
        t = time.perf_counter()
        make_huge_slide(huge)
        print(f"made {huge} in {time.perf_counter() - t:.0f} s")
    python = hs2p_python(args.hs2p_venv) if args.hs2p else None

    help_s, torch_s = startup()
    print(f"start-up: `cpath --help` {help_s:.2f} s (`import torch` alone {torch_s:.2f} s)")
    for name, path in (
        ("30000 x 20000 px, 0.25 mpp", large),
        ("30000 x 20000 px, 0.25 mpp, a green pen stroke", inked),
        ("100000 x 100000 px, 0.25 mpp", huge),
    ):
        # Ours and hs2p alternate, each round in fresh processes, so that a slower spell of
        # the machine falls on both; each figure is the median over the rounds.
        ours, theirs = [], []
        for i in range(args.rounds):
            with tempfile.TemporaryDirectory() as out:
                ours.append(run_child(path, Path(out), args.repeats, parts=i == 0))
            if python is not None:
                theirs.append(run_hs2p(python, path, args.repeats))
        r = ours[0]
        job_s = statistics.median(o["job_s"] for o in ours)
        memory_s = statistics.median(o["memory_s"] for o in ours)
        work = r["read_s"] + r["detect_s"] + r["grid_s"]
        print(
            f"\n{name}: {r['tiles']} tiles at 0.5 mpp, thumbnail {r['thumbnail'][1]}x{r['thumbnail'][0]} px "
            f"(steady state, median of {args.repeats}; the slide opened for each read)"
        )
        print(
            f"  parts: open + thumbnail read {r['read_s']:.4f} s, detection {r['detect_s']:.4f} s, "
            f"grid {r['grid_s']:.4f} s; bare open + read_region of the same level "
            f"{r['bare_read_s']:.4f} s -> (read + detection + grid) / bare read = "
            f"{work / r['bare_read_s']:.2f}x"
        )
        print(
            f"  outputs: polygons {r['polygons_s']:.4f} s, GeoJSON {r['geojson_s']:.4f} s, "
            f"QC image (JPEG) {r['qc_s']:.4f} s, coords file {r['coords_write_s']:.4f} s"
        )
        print(
            f"  in memory (tile_slide: open, read, detect, grid): {memory_s:.4f} s (rounds "
            f"{[round(o['memory_s'], 4) for o in ours]}) = {memory_s / r['bare_read_s']:.1f}x "
            "the bare read"
        )
        print(
            f"  whole per-slide job (coords file, GeoJSON, QC JPEG): {job_s:.4f} s (rounds "
            f"{[round(o['job_s'], 4) for o in ours]}) = {job_s / r['bare_read_s']:.1f}x the bare read"
        )
        print(
            f"  peak memory above the interpreter baseline: {r['peak_mib_above_baseline']:.0f} MiB "
            f"(baseline {r['baseline_mib']:.0f} MiB; thumbnail {np.prod(r['thumbnail']) * 3 / 2**20:.0f} MiB)"
        )
        if python is None:
            continue
        h = theirs[0]
        hs2p_s = statistics.median(t["median_s"] for t in theirs)
        hs2p_save_s = statistics.median(t["median_save_s"] for t in theirs)
        hs2p_preview_s = statistics.median(t["median_preview_s"] for t in theirs)
        size = tuple(r["size"])
        cover_ours = coverage(r["coords"], r["tile_size_level0"], size)
        cover_theirs = coverage(h["coords"], h["tile_size_level0"], size)
        iou = (cover_ours & cover_theirs).sum() / max(1, (cover_ours | cover_theirs).sum())
        print(
            f"  hs2p {h['version']}: {h['n_tiles']} tiles; in memory (tile_slide) {hs2p_s:.4f} s "
            f"(rounds {[round(t['median_s'], 4) for t in theirs]}), with its coordinate files "
            f"{hs2p_save_s:.4f} s (rounds {[round(t['median_save_s'], 4) for t in theirs]}), and "
            f"its tiling preview {hs2p_preview_s:.4f} s"
        )
        print(
            f"  ours / hs2p: in memory {memory_s / hs2p_s:.2f}x; whole job / hs2p with its files "
            f"{job_s / hs2p_save_s:.2f}x, with its files and preview {job_s / hs2p_preview_s:.2f}x; "
            f"whole job / hs2p in memory {job_s / hs2p_s:.2f}x"
        )
        print(
            f"  covered areas IoU {iou:.3f} (ours {cover_ours.mean():.1%} of the slide, hs2p "
            f"{cover_theirs.mean():.1%})"
        )
        truth = path.parent.parent / "ground_truth" / f"{path.stem}_pen.png"
        if truth.exists():
            from PIL import Image

            pen = np.asarray(Image.open(truth)) > 0
            ds = round(size[0] / pen.shape[1])
            counts = {
                share: [
                    pen_tiles(t["coords"], t["tile_size_level0"], pen, ds, share) for t in (r, h)
                ]
                for share in (0.25, 1e-9)
            }
            print(
                f"  pen ink ({pen.mean():.2%} of the slide): tiles at least a quarter ink: ours "
                f"{counts[0.25][0]}, hs2p {counts[0.25][1]}; tiles with any ink: ours "
                f"{counts[1e-9][0]}, hs2p {counts[1e-9][1]}"
            )


if __name__ == "__main__":
    main()
