"""Time the open-source tiler hs2p on one slide, for a side-by-side with ``cpath preprocess``.

Runs in hs2p's own virtual environment (never in ours, and hs2p is no dependency of the
``pipeline`` package), so this file imports nothing from ``pipeline``::

    data/bench/hs2p-venv/bin/python benchmarks/hs2p_child.py SLIDE OUT_JSON [--repeats N]

The venv is made with ``python3 -m venv data/bench/hs2p-venv`` and
``data/bench/hs2p-venv/bin/python -m pip install "hs2p[openslide]==6.1.0"``.

One in-process call of ``hs2p.tile_slide`` tiles the slide: open it with OpenSlide, read
the whole segmentation level, HSV tissue segmentation, contour detection and the tile grid
with per-tile tissue coverage. It returns an in-memory ``TilingResult`` and writes nothing
to disk. Timed three ways: the call alone; the call followed by ``save_tiling_result``,
which writes hs2p's coordinate files (an ``.npz`` and a JSON of metadata) into a fresh
folder; and these plus ``write_tiling_preview`` at hs2p's default preview downsample (32),
the tile-layout image its command line writes by default (it writes a mask preview too,
not made here).
Parameters: 256 px tiles at 0.5 um/px, no overlap, a tile kept when at least 0.5 of it is
tissue, segmentation on the pyramid level whose downsample is nearest to
``seg_spacing / level-0 spacing`` (16 um/px by default: hs2p itself defaults to
``downsample=64``, which is 16 um/px only on a 0.25 um/px slide). Other settings are
hs2p's defaults (tolerance 0.05, contour area filter ``a_t=4`` reference tiles, no pixel QC).

One warm-up call, then ``--repeats`` timed calls (``time.perf_counter``) of each; steady
state is their median. The JSON holds the version, times, tile count, level-0 top-left coordinates
of the last run (hs2p sorts them by x, then y) and the tile's level-0 side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import hs2p
import numpy as np
from hs2p import (
    FilterConfig,
    MaskSamplingConfig,
    SegmentationConfig,
    SlideSpec,
    TilingConfig,
    save_tiling_result,
    tile_slide,
    write_tiling_preview,
)
from hs2p.wsi.reader import open_slide


def seg_downsample_for(slide: Path, seg_spacing_um: float) -> tuple[int, float]:
    """hs2p's ``SegmentationConfig.downsample`` for a segmentation at ``seg_spacing_um``.

    hs2p picks the level whose downsample is nearest to this number, so passing
    ``seg_spacing_um / level-0 spacing`` selects the level nearest that spacing. The
    level-0 spacing is read as hs2p reads it (its OpenSlide backend).
    """
    reader = open_slide(slide, backend="openslide")
    try:
        base_um = float(reader.spacing)
    finally:
        reader.close()
    return max(1, round(seg_spacing_um / base_um)), base_um


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("slide", type=Path)
    parser.add_argument("out_json", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--spacing", type=float, default=0.5, help="target um/px")
    parser.add_argument("--tile-size", type=int, default=256, help="px at target spacing")
    parser.add_argument("--min-tissue", type=float, default=0.5, help="tissue fraction")
    parser.add_argument("--seg-spacing", type=float, default=16.0, help="um/px")
    parser.add_argument("--tolerance", type=float, default=0.05, help="hs2p default")
    args = parser.parse_args()

    seg_downsample, base_um = seg_downsample_for(args.slide, args.seg_spacing)
    spec = SlideSpec(sample_id=args.slide.stem, image_path=args.slide)
    tiling = TilingConfig(
        requested_spacing_um=args.spacing,
        requested_tile_size_px=args.tile_size,
        tolerance=args.tolerance,
        overlap=0.0,
        backend="openslide",
    )
    segmentation = SegmentationConfig(method="hsv", downsample=seg_downsample)
    # The shipped binary {background, tissue} vocabulary with only "tissue" sampled is
    # hs2p's tissue-tiling path; min_coverage["tissue"] is its per-tile threshold.
    masks = MaskSamplingConfig(
        pixel_mapping={"background": 0, "tissue": 1},
        colors=None,
        min_coverage={"tissue": args.min_tissue},
    )
    filtering = FilterConfig()

    def run():
        return tile_slide(
            spec,
            tiling=tiling,
            segmentation=segmentation,
            filtering=filtering,
            num_workers=1,
            masks=masks,
        )

    def timed(fn) -> list[float]:
        fn()  # warm-up: imports, OpenSlide and page-cache state
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times

    result = run()
    times = timed(run)
    with tempfile.TemporaryDirectory() as tmp:
        runs = iter(range(2 * args.repeats + 2))
        save_times = timed(lambda: save_tiling_result(run(), Path(tmp) / f"run{next(runs)}"))

        def with_preview() -> None:
            folder = Path(tmp) / f"run{next(runs)}"
            tiles = run()
            save_tiling_result(tiles, folder)
            write_tiling_preview(result=tiles, output_dir=folder, downsample=32)

        preview_times = timed(with_preview)

    coords = np.column_stack((result.x, result.y)).astype(np.int64)
    out = {
        "version": hs2p.__version__,
        "median_s": statistics.median(times) if times else None,
        "times_s": times,
        "median_save_s": statistics.median(save_times) if save_times else None,
        "save_times_s": save_times,
        "median_preview_s": statistics.median(preview_times) if preview_times else None,
        "preview_times_s": preview_times,
        "n_tiles": int(result.num_tiles),
        "coords": coords.tolist(),
        "tile_size_level0": int(result.tile_size_lv0),
        "params": {
            "api": "hs2p.tile_slide",
            "backend": result.backend,
            "requested_spacing_um": args.spacing,
            "requested_tile_size_px": args.tile_size,
            "overlap": 0.0,
            "tolerance": args.tolerance,
            "min_tissue_fraction": args.min_tissue,
            "seg_method": "hsv",
            "seg_spacing_requested_um": args.seg_spacing,
            "seg_downsample_requested": seg_downsample,
            "seg_level": int(result.seg_level),
            "seg_spacing_um": float(result.seg_spacing_um),
            "level0_spacing_um": base_um,
            "read_level": int(result.read_level),
            "read_spacing_um": float(result.read_spacing_um),
            "read_tile_size_px": int(result.read_tile_size_px),
            "is_within_tolerance": bool(result.is_within_tolerance),
            "step_px_lv0": int(result.step_px_lv0),
            "num_workers": 1,
            "a_t": filtering.a_t,
            "ref_tile_size": filtering.ref_tile_size,
            "repeats": args.repeats,
        },
    }
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(out))
    print(
        f"hs2p {out['version']}: {out['n_tiles']} tiles, median {out['median_s']} s "
        f"over {args.repeats} runs {[round(t, 4) for t in times]}"
    )


if __name__ == "__main__":
    main()
