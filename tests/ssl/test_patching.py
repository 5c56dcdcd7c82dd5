"""Online patching at several mpps inside the tissue of a preprocess run of a real slide."""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import torch
import torch.nn.functional as F
from skimage.measure import points_in_poly

from pipeline.errors import PipelineError
from pipeline.ssl.patching import (
    OnlinePatches,
    PatchLocation,
    TissueIndex,
    load_tissue_polygons,
    polygons_area,
)
from pipeline.wsi.preprocess import PreprocessConfig, preprocess
from pipeline.wsi.reader import resample

ROOT = Path(__file__).resolve().parents[2]
CMU_MPP, CMU_SIZE = 0.499, (2220, 2967)  # level-0 um per px, (width, height)


@pytest.fixture(scope="module")
def cmu_run(tmp_path_factory, cmu_svs) -> Path:
    """The real CMU Aperio slide preprocessed twice: as scanned ('cmu', 0.499 mpp) and as if
    scanned at 40x ('cmu40', given level-0 mpp 0.25)."""
    root = tmp_path_factory.mktemp("cmu_patching")
    listing = root / "slides.csv"
    listing.write_text(f"path,slide_id,mpp\n{cmu_svs},cmu,\n{cmu_svs},cmu40,0.25\n")
    cfg = PreprocessConfig(slides=str(listing), out=root / "run", tile_size=128, thumbnails=False)
    rows = preprocess(cfg, progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    return root / "run"


def _patches(run: Path, slides=("cmu",), **kwargs) -> OnlinePatches:
    return OnlinePatches([run / "coords" / f"{s}.h5" for s in slides], **kwargs)


def _geojson_polygons(path: Path) -> list[list[np.ndarray]]:
    """The polygons, parsed here on their own (level-0 (x, y))."""
    features = json.loads(path.read_text())["features"]
    return [[np.asarray(r, float) for r in f["geometry"]["coordinates"]] for f in features]


def _in_polygons(polygons, points: np.ndarray) -> np.ndarray:
    """Which level-0 points (N x 2 (x, y)) lie inside a polygon, not in its holes."""
    inside = np.zeros(len(points), bool)
    for p in polygons:
        piece = points_in_poly(points, p[0])
        for hole in p[1:]:
            piece &= ~points_in_poly(points, hole)
        inside |= piece
    return inside


def _polygon_share(polygons, x0: int, y0: int, size0: int, n: int = 16) -> float:
    """Tissue share of a tile by point sampling on an n x n grid against the polygons."""
    offsets = (np.arange(n) + 0.5) * size0 / n
    points = np.stack(np.meshgrid(x0 + offsets, y0 + offsets), -1).reshape(-1, 2)  # N x 2
    return float(_in_polygons(polygons, points).mean())


@pytest.mark.parametrize(
    ("slide", "level0_mpp", "mpp"),
    [("cmu40", 0.25, 0.5), ("cmu", CMU_MPP, 1.0)],  # 0.25/0.5 and 0.5/1 um per px
)
def test_tile_side_scales_with_mpp_and_covers_the_same_microns(
    cmu_run, cmu_svs, slide, level0_mpp, mpp
):
    fine = _patches(cmu_run, (slide,), mpps=(mpp / 2,), tile_px=512, seed=3, length=3)
    coarse = _patches(cmu_run, (slide,), mpps=(mpp,), tile_px=256, seed=3, length=3)
    size0 = round(256 * mpp / level0_mpp)  # 512 and 513 level-0 px: 128 and 256 um
    with openslide.OpenSlide(str(cmu_svs)) as raw:
        for i in range(3):
            a, b = fine.draw(i), coarse.draw(i)
            assert a.size0 == b.size0 == size0  # 512 px at m/2 covers 256 px at m
            assert (a.slide, a.x0, a.y0) == (b.slide, b.x0, b.y0)  # the same draw, same place
            big, small = fine.read(i), coarse.read(i)
            assert big.shape == (3, 512, 512) and small.shape == (3, 256, 256)
            # the pixels are the slide's at (x0, y0): x is the column, y the row
            region = np.array(raw.read_region((a.x0, a.y0), 0, (512, 512)).convert("RGB"))
            assert np.array_equal(big, region.transpose(2, 0, 1))
            half = F.avg_pool2d(torch.from_numpy(big).float()[None], 2)[0]  # 3 x 256 x 256
            same = (half - torch.from_numpy(small).float()).abs().mean()
            moved = PatchLocation(b.slide, b.x0 + 16, b.y0 + 8, b.size0, b.mpp, 0.0, 1, False)
            shifted = torch.from_numpy(coarse.read_location(moved)).float()
            other = (half - shifted).abs().mean()
            # a 2 x 2 mean is not the reader's antialiased resampling, and 0.5 um tiles of
            # the 0.499 um slide are read 1:1 (512 of the 513 px): close, not equal (how
            # close depends on the texture under the draw)
            assert same < 12 and other > 3 * same, (same, other)
            if size0 == 512:  # an exact factor of 2: the reader's own resampling is exact
                exact = resample(np.ascontiguousarray(big.transpose(1, 2, 0)), (256, 256))
                assert np.abs(exact.transpose(2, 0, 1).astype(int) - small).max() <= 1


def test_each_mpp_has_its_own_tile_side(cmu_run):
    mixed = _patches(cmu_run, mpps=(0.5, 1.0, 2.0), tile_px=128, seed=0, length=60)
    sides = {mixed.draw(i).mpp: mixed.draw(i).size0 for i in range(60)}
    assert sides == {m: round(128 * m / CMU_MPP) for m in (0.5, 1.0, 2.0)}  # 128, 257, 513


def test_random_positions_stay_inside_tissue_and_follow_the_mpp_weights(cmu_run):
    n = 300
    kwargs = dict(mpps=(0.5, 1.0, 2.0), mpp_weights=(1, 2, 1), tile_px=128, min_tissue=0.4)
    patches = _patches(cmu_run, length=n, **kwargs)
    polygons = _geojson_polygons(cmu_run / "tissue" / "cmu.geojson")
    draws = [patches.draw(i) for i in range(n)]
    assert not any(d.fallback for d in draws)
    width, height = CMU_SIZE
    for d in draws:
        assert 0 <= d.x0 <= width - d.size0 and 0 <= d.y0 <= height - d.size0
        assert d.tissue_share >= 0.4
    centres = np.array([(d.x0 + d.size0 / 2, d.y0 + d.size0 / 2) for d in draws])
    assert _in_polygons(polygons, centres).all()
    # the mask's share agrees with the polygons' own (point sampling), tile by tile
    checked = draws[:60]
    shares = np.array([_polygon_share(polygons, d.x0, d.y0, d.size0) for d in checked])
    assert (shares >= 0.3).all()
    assert np.abs(shares - [d.tissue_share for d in checked]).mean() < 0.05
    # the positions spread over the tissue, not one spot
    assert len({(round(x), round(y)) for x, y in centres}) == n and centres.std(0).min() > 100
    counts = np.array([sum(d.mpp == m for d in draws) for m in (0.5, 1.0, 2.0)])
    expected = n * np.array([0.25, 0.5, 0.25])
    assert ((counts - expected) ** 2 / expected).sum() < 13.8  # chi-square, 2 dof, p = 0.001


def test_draws_are_a_pure_function_of_seed_and_index(cmu_run, tmp_path):
    kwargs = dict(mpps=(0.5, 1.0, 2.0), tile_px=128, seed=7, length=50)
    patches = _patches(cmu_run, **kwargs)
    first = [patches.locate(i) for i in range(50)]
    assert [patches.locate(i) for i in reversed(range(50))] == first[::-1]  # order-free
    item = patches[0]  # opens the slide and builds its tissue index
    assert item["image"].shape == (3, 128, 128) and item["image"].dtype == torch.uint8
    assert torch.equal(item["image"], torch.from_numpy(patches.read(0)))
    assert item["coords"].tolist() == list(first[0][1:3]) and item["mpp"] == first[0][4]
    state = pickle.dumps(patches)
    assert len(state) < 200_000  # no tissue mask, no open slide in the pickled state
    copy = pickle.loads(state)
    assert not copy._open and not copy._tissue
    assert [copy.locate(i) for i in range(50)] == first
    assert np.array_equal(copy.read(5), patches.read(5))
    assert [_patches(cmu_run, **kwargs).locate(i) for i in range(50)] == first
    other = _patches(cmu_run, **{**kwargs, "seed": 8})
    assert sum(other.locate(i) == first[i] for i in range(50)) <= 2
    (tmp_path / "patches.pkl").write_bytes(state)
    code = (
        "import pickle, sys; p = pickle.load(open(sys.argv[1], 'rb')); "
        "print([list(p.locate(i)) for i in range(50)])"
    )
    command = [sys.executable, "-c", code, str(tmp_path / "patches.pkl")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == [list(t) for t in first]


def test_slides_serve_only_the_mpps_they_can(cmu_run):
    both = _patches(cmu_run, ("cmu", "cmu40"), mpps=(0.25, 0.5), tile_px=128, length=200)
    # 0.25 um is finer than cmu's level 0 (0.499): only cmu40 serves it
    assert both.servable.tolist() == [[False, True], [True, True]]
    draws = [both.draw(i) for i in range(200)]
    assert {d.mpp for d in draws if d.slide == 0} == {0.5}
    assert {d.mpp for d in draws if d.slide == 1} == {0.25, 0.5}
    assert {(d.slide, d.mpp, d.size0) for d in draws} == {
        (0, 0.5, 128),
        (1, 0.25, 128),
        (1, 0.5, 256),
    }
    upsampled = _patches(cmu_run, mpps=(0.25,), tile_px=128, allow_upsampling=True, length=1)
    assert upsampled.draw(0).size0 == 64
    # a tile larger than a slide: that slide skips the mpp; no slide serving anything is an error
    big = _patches(cmu_run, ("cmu", "cmu40"), mpps=(4.0,), tile_px=256, length=20)
    assert big.servable.tolist() == [[True], [False]]  # 2052 px fits 2220, 4096 does not
    assert {big.draw(i).slide for i in range(20)} == {0}
    with pytest.raises(PipelineError, match="can serve"):
        _patches(cmu_run, mpps=(8.0,), tile_px=512)


def test_slides_weighted_by_tissue_area(cmu_run):
    kwargs = dict(mpps=(0.5,), tile_px=128, length=400)
    areas = (
        np.array(
            [
                polygons_area(load_tissue_polygons(cmu_run / "tissue" / f"{s}.geojson"))
                for s in ("cmu", "cmu40")
            ]
        )
        * np.array([CMU_MPP, 0.25]) ** 2
    )  # um^2
    assert 0.2 < areas[1] / areas[0] < 0.3  # the same tissue, a quarter of the microns
    for weighting, share in (("uniform", 0.5), ("tissue", areas[0] / areas.sum())):
        p = _patches(cmu_run, ("cmu", "cmu40"), slide_weights=weighting, **kwargs)
        picked = np.mean([p.draw(i).slide == 0 for i in range(400)])
        assert abs(picked - share) < 0.07, (weighting, picked, share)
    explicit = _patches(cmu_run, ("cmu", "cmu40"), slide_weights=[0, 1], **kwargs)
    assert {explicit.draw(i).slide for i in range(40)} == {1}


def test_tiles_per_visit_keeps_a_slide_for_consecutive_draws(cmu_run):
    p = _patches(cmu_run, ("cmu", "cmu40"), mpps=(0.5,), tile_px=128, length=64, tiles_per_visit=8)
    slides = [p.draw(i).slide for i in range(64)]
    assert all(len(set(slides[k : k + 8])) == 1 for k in range(0, 64, 8))
    assert len(set(slides)) == 2


def test_fallback_is_the_nearest_grid_tile_when_no_position_has_enough_tissue(cmu_run, tmp_path):
    strip = {  # a 20-px strip of "tissue": no 128-px tile can be 40% tissue
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [
                        [[1000, 200], [1020, 200], [1020, 2800], [1000, 2800], [1000, 200]]
                    ],
                },
            }
        ],
    }
    (tmp_path / "cmu.geojson").write_text(json.dumps(strip))
    p = _patches(cmu_run, mpps=(0.5,), tile_px=128, tissue_dir=tmp_path, max_tries=5, length=10)
    grid = p.tables[0].coords + p.tables[0].patch_size_level0 / 2  # N x 2 grid tile centres
    for i in range(10):
        d = p.draw(i)
        assert d.fallback and d.tries == 5 and d.tissue_share < 0.4
        assert 0 <= d.x0 <= CMU_SIZE[0] - d.size0 and 0 <= d.y0 <= CMU_SIZE[1] - d.size0
        centre = np.array([d.x0 + d.size0 / 2, d.y0 + d.size0 / 2])
        assert np.abs(grid - centre).max(1).min() <= 1  # centred on a grid tile
        assert p.draw(i) == d


def test_tissue_index_rasterises_holes_and_bounds_memory():
    square = np.array([[0, 0], [800, 0], [800, 800], [0, 800], [0, 0]], float)
    # edges on cell edges (16 level-0 px per cell): the hole is cells 12-36, the island 22-27
    hole = np.array([[192, 192], [592, 192], [592, 592], [192, 592], [192, 192]], float)
    island = np.array([[352, 352], [448, 352], [448, 448], [352, 448], [352, 352]], float)
    index = TissueIndex.build([[square, hole], [island]], 1000, 1200, 0.5, mask_mpp=8.0)
    assert index.cell0 == 16 and index.mask.shape == (50, 50)  # 800 px / 16 px per cell
    assert index.cells == 50 * 50 - 25 * 25 + 6 * 6
    assert index.in_tissue(100, 100) and not index.in_tissue(300, 300) and index.in_tissue(400, 400)
    assert index.tissue_share(0, 0, 160) == 1.0 and index.tissue_share(250, 250, 80) == 0.0
    assert index.tissue_share(900, 900, 100) == 0.0  # outside the tissue's box
    # [0, 400) holds 13 x 13 hole cells (192-400), 3 x 3 of them island (352-400)
    assert index.tissue_share(0, 0, 400) == pytest.approx(1 - (208**2 - 48**2) / 400**2)
    # x is the column: a wide rectangle stays wide
    wide = TissueIndex.build(
        [[np.array([[0, 0], [640, 0], [640, 160], [0, 160]], float)]], 700, 700, 1.0, 16.0
    )
    assert wide.mask.shape == (10, 40)
    capped = TissueIndex.build([[square]], 1000, 1200, 0.5, mask_mpp=8.0, max_cells=100)
    assert capped.mask.size <= 100 and capped.cell_mpp > 8.0 and capped.nbytes < 2000


def test_missing_tissue_geojson_says_to_rerun_preprocess(cmu_run, tmp_path):
    (tmp_path / "coords").mkdir()
    shutil.copy(cmu_run / "coords" / "cmu.h5", tmp_path / "coords" / "cmu.h5")
    with pytest.raises(PipelineError, match=r"cmu\.geojson.*rerun `cpath preprocess`"):
        OnlinePatches([tmp_path / "coords" / "cmu.h5"], mpps=(0.5,), tile_px=128)


def test_tissue_mask_is_the_polygons_at_cell_centres(cmu_run):
    polygons = _geojson_polygons(cmu_run / "tissue" / "cmu.geojson")
    index = TissueIndex.from_geojson(cmu_run / "tissue" / "cmu.geojson", *CMU_SIZE, CMU_MPP)
    assert index.cell_mpp == pytest.approx(8.0) and 0 < index.cells < index.mask.size
    rows, cols = np.indices(index.mask.shape)
    centres = np.stack([cols + index.origin[0] + 0.5, rows + index.origin[1] + 0.5], -1)
    inside = _in_polygons(polygons, centres.reshape(-1, 2) * index.cell0)
    assert np.array_equal(inside.reshape(index.mask.shape), index.mask)
    area = polygons_area(polygons) / index.cell0**2  # in cells
    assert abs(index.cells / area - 1) < 0.05
