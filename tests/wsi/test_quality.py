"""Tile quality filters on the real CMU slide (with black, grey and blurred tiles made in
it) and on demo slides: which tiles go, which stay, and the counts in the manifest."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
from scipy import ndimage

from pipeline.errors import ConfigError
from pipeline.wsi.coords import read_coords
from pipeline.wsi.preprocess import PreprocessConfig, preprocess
from pipeline.wsi.quality import QualityConfig, blur_score
from pipeline.wsi.reader import Slide
from pipeline.wsi.tissue import TissueConfig
from pipeline.wsi.writer import write_aperio_tiff

CMU_MPP = 0.499
FINE = TissueConfig(mpp=4.0)  # detection at 4 um/px: a 128-um tile is 32 px, shares to ~3%
BAND = 0.3  # share of a tile's height painted black or grey
FILTERS = QualityConfig(white_max=0.3, black_max=0.2, grey_max=0.2, blur_min=400.0)


def _run(slide: Path, out: Path, quality: QualityConfig) -> tuple[dict, dict]:
    """Preprocess one slide: its tiles (level-0 corner -> tissue share) and manifest row."""
    rows = preprocess(
        PreprocessConfig(slides=str(slide), out=out, tile_size=256, tissue=FINE, quality=quality),
        progress=False,
    )
    assert rows[0]["status"] == "ok", rows[0]["error"]
    table = read_coords(out / "coords" / f"{slide.stem}.h5")
    tiles = zip(map(tuple, table.coords.tolist()), table.tissue_fraction.tolist(), strict=True)
    return dict(tiles), rows[0]


def _white_share(image: np.ndarray, x: int, y: int, size: int) -> float:
    return float((image[y : y + size, x : x + size] > 220).all(-1).mean())


@pytest.fixture(scope="module")
def altered(tmp_path_factory, cmu_svs) -> dict:
    """The CMU slide with three rows of tissue tiles altered: the top 30% of each tile of
    one row painted black, of another made grey (its own luminance), a third blurred
    (Gaussian, sigma 1.5 um); written as an Aperio TIFF and preprocessed without and with
    the filters."""
    root = tmp_path_factory.mktemp("quality")
    grid, _ = _run(cmu_svs, root / "grid", QualityConfig())
    size0 = round(256 * 0.5 / CMU_MPP)
    with Slide(cmu_svs) as slide:
        image = slide.read_region((0, 0), 0, slide.dimensions)  # H x W x 3
    rows: dict[int, list] = {}
    for (x, y), share in sorted(grid.items()):
        if share >= 0.95:  # whole tissue tiles: still tissue with a band painted over
            rows.setdefault(y, []).append(x)
    picked = sorted((y for y, xs in rows.items() if len(xs) >= 2), key=lambda y: -len(rows[y]))
    assert len(picked) >= 3, "the CMU slide should have three rows of tissue tiles"
    black_y, grey_y, blur_y = picked[:3]
    band = round(BAND * size0)
    for x in rows[black_y]:
        image[black_y : black_y + band, x : x + size0] = 10
    for x in rows[grey_y]:
        region = image[grey_y : grey_y + band, x : x + size0].astype(np.float32)
        image[grey_y : grey_y + band, x : x + size0] = (region @ [0.299, 0.587, 0.114])[..., None]
    lo, hi = blur_y - 20, blur_y + size0 + 20  # blur with a margin, paste the tiles' part
    blurred = ndimage.gaussian_filter(image[lo:hi].astype(np.float32), (3, 3, 0))
    for x in rows[blur_y]:
        part = blurred[20 : 20 + size0, x : x + size0]
        image[blur_y : blur_y + size0, x : x + size0] = part.round().clip(0, 255).astype(np.uint8)
    slide = write_aperio_tiff(root / "altered.svs", image, CMU_MPP, 20)
    plain, plain_row = _run(slide, root / "plain", QualityConfig())
    kept, row = _run(slide, root / "filtered", FILTERS)
    plain, kept = set(plain), set(kept)
    return {
        "image": image,
        "size0": size0,
        "rows": {
            k: {(x, y) for x in rows[y]}
            for k, y in zip(("black", "grey", "blur"), picked[:3], strict=True)
        },
        "plain": plain,
        "plain_row": plain_row,
        "kept": kept,
        "row": row,
        "out": root / "filtered",
    }


def test_black_grey_and_blurred_tiles_go_and_are_counted(altered):
    plain, kept, row = altered["plain"], altered["kept"], altered["row"]
    assert kept < plain
    for name in ("black", "grey", "blur"):
        tiles = altered["rows"][name]
        assert tiles <= plain, f"the {name} row is still tissue without the filters"
        assert not tiles & kept, f"{name} tiles kept: {sorted(tiles & kept)}"
    assert row["n_black"] == len(altered["rows"]["black"])
    assert row["n_grey"] == len(altered["rows"]["grey"])
    assert row["n_blurry"] == len(altered["rows"]["blur"])
    assert altered["plain_row"]["n_black"] == altered["plain_row"]["n_white"] == 0
    with open(altered["out"] / "manifest.csv") as f:
        manifest = next(csv.DictReader(f))
    assert int(manifest["n_blurry"]) == row["n_blurry"] and int(manifest["n_tiles"]) == len(kept)
    attrs = read_coords(altered["out"] / "coords" / "altered.h5").attrs
    assert attrs["n_grey"] == row["n_grey"]
    assert json.loads(attrs["quality_params"])["blur_min"] == 400.0


def test_other_tiles_stay_unless_mostly_white(altered):
    """Outside the altered rows a tile goes only for glass: kept tiles are at most ~30%
    white and dropped ones more (white measured here on level-0 pixels; the filter sees the
    4-um image, so shares within 0.1 of the limit may go either way)."""
    image, size0 = altered["image"], altered["size0"]
    altered_tiles = set().union(*altered["rows"].values())
    dropped_white = 0
    for tile in altered["plain"] - altered_tiles:
        share = _white_share(image, *tile, size0)
        if tile in altered["kept"]:
            assert share < 0.4, (tile, share)
        else:
            dropped_white += 1
            assert share > 0.2, (tile, share)
    assert dropped_white == altered["row"]["n_white"] > 0


def test_blur_score_separates_sharp_from_out_of_focus_tissue(altered, cmu_svs):
    """On the unaltered slide's tissue tiles read at 1 um/px, sharp tissue scores far
    above the 400 limit and the same tiles blurred by 1.5 um far below it."""
    size0 = altered["size0"]
    with Slide(cmu_svs) as slide:
        tiles = [slide.read_tile(t, (size0, size0), (128, 128)) for t in sorted(altered["plain"])]
    sharp = [blur_score(t) for t in tiles]
    soft = [blur_score(ndimage.gaussian_filter(t, (1.5, 1.5, 0))) for t in tiles]
    assert min(sharp) > 2 * 400 and max(soft) < 400 / 2


def test_white_filter_on_demo_slides(tmp_path, tiny_cohort):
    slides = sorted((tiny_cohort / "slides").glob("*.svs"))[:2]
    for slide in slides:
        _, plain_row = _run(slide, tmp_path / "plain", QualityConfig())
        kept, row = _run(slide, tmp_path / "white", QualityConfig(white_max=0.1))
        table = read_coords(tmp_path / "white" / "coords" / f"{slide.stem}.h5")
        assert row["n_white"] > 0 and row["n_tiles"] == plain_row["n_tiles"] - row["n_white"]
        with openslide.OpenSlide(str(slide)) as raw:
            size0 = table.patch_size_level0
            for x, y in table.coords[:50]:
                tile = np.asarray(raw.read_region((int(x), int(y)), 0, (size0, size0)))[..., :3]
                assert (tile > 220).all(-1).mean() < 0.2, (slide.name, x, y)


def test_bad_quality_settings_are_config_errors(tmp_path):
    for bad in (QualityConfig(white_max=1.5), QualityConfig(black_level=300)):
        with pytest.raises(ConfigError, match="--quality"):
            PreprocessConfig(slides=str(tmp_path), out=tmp_path, quality=bad).validate()
