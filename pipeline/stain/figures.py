"""Stain normalization of a preprocessed cohort, shown: fit to a reference tile, a before /
after strip of one tile per slide, and the slide-clustering report (used by the demo)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.data.tiles import TileDataset
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, atomic_write_text
from pipeline.stain.base import make_normalizer
from pipeline.wsi.coords import list_coords_files, read_coords


def reference_tile(coords_dir: str | os.PathLike) -> tuple[np.ndarray, str]:
    """``(3 x H x W uint8, "slide:row")``: the tile with the most tissue of the first slide."""
    files = list_coords_files(coords_dir)
    for path in files:
        table = read_coords(path)
        if len(table):
            row = int(np.argmax(table.tissue_fraction))
            return TileDataset([path]).read(row), f"{path.stem}:{row}"
    raise PipelineError(f"{coords_dir}: no tiles to take a reference from")


def _strip(rows: list[list[np.ndarray]]) -> Image.Image:
    """Rows of equally sized ``3 x H x W`` tiles as one image, 4 px apart."""
    h, w = rows[0][0].shape[1:]
    gap = 4
    canvas = np.full(
        (len(rows) * (h + gap) - gap, len(rows[0]) * (w + gap) - gap, 3), 255, np.uint8
    )
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            canvas[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = (
                tile.transpose(1, 2, 0)
            )
    return Image.fromarray(canvas)


def stain_demo(
    coords_dir: str | os.PathLike,
    out: str | os.PathLike,
    method: str = "macenko",
    per_slide: int = 16,
    strip_slides: int = 8,
) -> dict:
    """Fit ``method`` to the reference tile and write ``out/``: ``reference.png``,
    ``stain.json``, ``before_after.png`` (top: original, bottom: normalized) and
    ``report.json`` (slide-ID probe on colour statistics before and after)."""
    from pipeline.stain.report import colour_features, slide_clustering

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = list_coords_files(coords_dir)
    stamps = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = {"method": method, "per_slide": per_slide, "strip_slides": strip_slides, "coords": stamps}
    done = [out / n for n in ("report.json", "stain.json", "reference.png", "before_after.png")]
    if all(p.is_file() for p in done):  # a rerun on the same coords files reuses the outputs
        report = json.loads(done[0].read_text())
        if report.get("key") == json.loads(json.dumps(key)):
            return _facts(report)
    reference, where = reference_tile(coords_dir)
    with atomic_path(out / "reference.png") as tmp:
        Image.fromarray(reference.transpose(1, 2, 0)).save(tmp, format="PNG")
    normalizer = make_normalizer(method).fit(torch.from_numpy(reference))
    normalizer.save(out / "stain.json")
    dataset = TileDataset(files)
    rng = np.random.default_rng(0)
    picks, slides = [], []
    for s in range(len(files)):
        start, stop = int(dataset.offsets[s]), int(dataset.offsets[s + 1])
        if stop - start >= 2:
            rows = rng.choice(np.arange(start, stop), min(per_slide, stop - start), replace=False)
            picks += sorted(rows.tolist())
            slides += [s] * len(rows)
    if len(set(slides)) < 2:
        raise PipelineError(f"{coords_dir}: the stain report needs tiles of two or more slides")
    tiles = torch.stack([torch.from_numpy(dataset.read(i)) for i in picks])  # N x 3 x H x W
    dataset.close()
    normalized = torch.cat([normalizer(tiles[i : i + 256]) for i in range(0, len(tiles), 256)])
    slides = np.array(slides)
    first = [int(np.flatnonzero(slides == s)[0]) for s in np.unique(slides)[:strip_slides]]
    with atomic_path(out / "before_after.png") as tmp:
        _strip([[tiles[i].numpy() for i in first], [normalized[i].numpy() for i in first]]).save(
            tmp, format="PNG"
        )
    before = slide_clustering(colour_features(tiles), slides)
    after = slide_clustering(colour_features(normalized), slides)
    report = {"method": method, "reference": where, "before": before, "after": after, "key": key}
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    return _facts(report)


def _facts(report: dict) -> dict:
    return {
        "reference": report["reference"],
        "before": report["before"]["slide_probe_accuracy"],
        "after": report["after"]["slide_probe_accuracy"],
        "chance": report["before"]["chance"],
    }
