import csv
import json
import math
from collections import defaultdict

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from pipeline.data.demo import generate_slide, load_textures, make_cohort, plan_cohort, tile_labels
from tests.conftest import CACHE


def _records(cohort):
    return json.loads((cohort / "cohort.json").read_text())["slides"]


def _mask(cohort, slide_id, name):
    return np.asarray(Image.open(cohort / "ground_truth" / f"{slide_id}_{name}.png")) > 0


def test_slides_open_in_openslide_as_aperio_with_mpp_and_levels(tiny_cohort):
    records = _records(tiny_cohort)
    assert {r["site"] for r in records} >= {"A", "C"}  # both 20x and 40x scanners
    for r in records:
        with openslide.OpenSlide(str(tiny_cohort / r["path"])) as slide:
            props = slide.properties
            assert props["openslide.vendor"] == "aperio"
            assert float(props["openslide.mpp-x"]) == pytest.approx(r["mpp"], abs=1e-4)
            assert float(props["openslide.mpp-y"]) == pytest.approx(r["mpp"], abs=1e-4)
            assert int(props["openslide.objective-power"]) == r["magnification"]
            assert slide.dimensions == (r["width"], r["height"])
            assert slide.level_count == r["level_count"] >= 2
            for k, ds in enumerate(slide.level_downsamples):
                assert ds == pytest.approx(4**k, rel=0.01)
            assert "thumbnail" in slide.associated_images
        with tifffile.TiffFile(tiny_cohort / r["path"]) as tif:
            assert tif.pages[0].is_tiled and tif.pages[0].compression == 7  # JPEG tiles


def test_labels_csv_matches_ground_truth_masks(tiny_cohort):
    records = {r["slide_id"]: r for r in _records(tiny_cohort)}
    with open(tiny_cohort / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["slide_id"] for r in rows] == sorted(records)
    assert set(rows[0]) == {"slide_id", "case_id", "label", "site", "time", "event"}
    by_case = defaultdict(list)
    for row in rows:
        tissue = _mask(tiny_cohort, row["slide_id"], "tissue")
        tumor = _mask(tiny_cohort, row["slide_id"], "tumor")
        pen = _mask(tiny_cohort, row["slide_id"], "pen")
        assert tissue.mean() > 0.03
        assert tumor.any() == (row["label"] == "tumor")
        assert not (tumor & ~tissue).any(), "tumour must lie inside tissue"
        assert not (pen & tissue).any(), "pen ink is drawn on glass only"
        assert float(row["time"]) > 0 and row["event"] in {"0", "1"}
        by_case[row["case_id"]].append(row)
    assert any(len(v) == 2 for v in by_case.values()), "some patients have two slides"
    for slides in by_case.values():  # one patient, one label and one survival outcome
        assert len({(s["label"], s["time"], s["event"]) for s in slides}) == 1
    assert {r["label"] for r in rows} == {"tumor", "normal"}


def test_pixels_agree_with_the_masks(tiny_cohort):
    """Tissue masks cover stained pixels; glass is unstained."""
    for r in _records(tiny_cohort):
        tissue = _mask(tiny_cohort, r["slide_id"], "tissue")
        with openslide.OpenSlide(str(tiny_cohort / r["path"])) as slide:
            level = slide.level_count - 1
            region = slide.read_region((0, 0), level, slide.level_dimensions[level])
            ds = r["mask_downsample"] / slide.level_downsamples[level]
        small = np.asarray(region.convert("RGB").resize(tissue.shape[::-1], Image.BOX))
        sat = small.max(-1).astype(int) - small.min(-1)
        core = tissue & ~np.roll(~tissue, 1, 0) & ~np.roll(~tissue, -1, 0)  # away from edges
        assert np.median(sat[core]) > 40, r["slide_id"]
        glass = ~tissue & ~_mask(tiny_cohort, r["slide_id"], "pen")
        assert np.median(sat[glass]) < 15, r["slide_id"]
        assert ds > 1


def test_generation_is_deterministic(tmp_path):
    plan = plan_cohort(6, seed=3, size_scale=0.2)[1]
    textures = load_textures(CACHE)
    first = generate_slide(plan, textures, tmp_path / "a")
    second = generate_slide(plan, textures, tmp_path / "b")
    assert {k: v for k, v in first.items() if k != "seconds"} == {
        k: v for k, v in second.items() if k != "seconds"
    }
    a = tifffile.imread(tmp_path / "a" / first["path"])
    b = tifffile.imread(tmp_path / "b" / second["path"])
    assert a.shape == (plan.height, plan.width, 3)
    np.testing.assert_array_equal(a, b)


def test_rerun_keeps_finished_slides_and_redoes_missing_ones(tmp_path):
    out = tmp_path / "cohort"
    make_cohort(
        out, n_slides=3, seed=5, size_scale=0.15, workers=1, cache_dir=CACHE, progress=False
    )
    slides = sorted((out / "slides").glob("*.svs"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in slides}
    slides[1].unlink()
    make_cohort(
        out, n_slides=3, seed=5, size_scale=0.15, workers=1, cache_dir=CACHE, progress=False
    )
    after = {p.name: p.stat().st_mtime_ns for p in sorted((out / "slides").glob("*.svs"))}
    assert set(after) == set(mtimes)
    assert after[slides[0].name] == mtimes[slides[0].name]
    assert after[slides[2].name] == mtimes[slides[2].name]
    assert not list(out.rglob("*.tmp")), "no temporary files are left behind"


def test_plan_balances_classes_and_sizes():
    plans = plan_cohort(32, seed=0)
    assert sum(p.label == "tumor" for p in plans) == 16
    assert len({p.case_id for p in plans}) == 24
    for p in plans:
        assert 2000 <= max(p.width, p.height) <= 20000
        assert p.mask_downsample * p.mpp == pytest.approx(8.0, rel=0.05)
    assert math.isclose(min(p.mpp for p in plans), 0.25)


def test_tile_labels_follow_the_ground_truth_tumour_masks(tiny_prep, tiny_cohort):
    rows = tile_labels(tiny_prep / "coords", tiny_cohort)
    with open(tiny_cohort / "labels.csv") as f:
        slide_label = {r["slide_id"]: r["label"] for r in csv.DictReader(f)}
    tumour_slides = {r["slide_id"] for r in rows if r["label"] == "tumor"}
    assert tumour_slides and all(slide_label[s] == "tumor" for s in tumour_slides)
    assert {r["label"] for r in rows} == {"tumor", "normal"}
    capped = tile_labels(tiny_prep / "coords", tiny_cohort, per_slide=5)
    per = {}
    for r in capped:
        per[(r["slide_id"], r["label"])] = per.get((r["slide_id"], r["label"]), 0) + 1
    assert max(per.values()) <= 5
