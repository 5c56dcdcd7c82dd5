import csv
import json
import math
from collections import defaultdict

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from pipeline.data.demo import generate_slide, make_cohort, plan_cohort, tile_labels
from pipeline.data.textures import (
    DEVELOPMENT,
    HELD_OUT,
    TEXTURES,
    TISSUE_CLASSES,
    load_textures,
    texture_blocks,
)
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
    development = sorted(s for s, r in records.items() if r["cohort"] == DEVELOPMENT)
    assert [r["slide_id"] for r in rows] == development
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


def test_texture_blocks_are_a_checkerboard_of_the_whole_texture():
    textures = load_textures(CACHE)
    for name, image in textures.items():
        blocks = texture_blocks(name, image.shape[:2])
        cover = np.zeros(image.shape[:2], np.int32)
        for b in blocks:
            cover[b.y0 : b.y1, b.x0 : b.x1] += 1
            assert min(b.y1 - b.y0, b.x1 - b.x0) * TEXTURES[name].mpp >= 60, name
        assert (cover == 1).all(), f"{name}: blocks overlap or leave gaps"
        for a in blocks:  # blocks that share an edge belong to different cohorts
            for b in blocks:
                touching = (a.y1 == b.y0 and a.x0 == b.x0) or (a.x1 == b.x0 and a.y0 == b.y0)
                assert not touching or a.cohort != b.cohort, name
        assert {b.cohort for b in blocks} == {DEVELOPMENT, HELD_OUT}


def test_no_held_out_tissue_reaches_a_development_slide(tiny_cohorts):
    """Every quilt patch drawn on a slide was cut inside one block of its cohort's regions,
    from the slide's own textures; the cohorts share no slide, patient or site."""
    summary = json.loads((tiny_cohorts / "cohort.json").read_text())
    records = summary["slides"]
    blocks = {(name, b["index"]): b for name, t in summary["textures"].items() for b in t["blocks"]}
    seen = {DEVELOPMENT: set(), HELD_OUT: set()}
    for r in records:
        with open(tiny_cohorts / "ground_truth" / f"{r['slide_id']}_patches.csv") as f:
            patches = list(csv.DictReader(f))
        assert len(patches) > 20, r["slide_id"]
        layers = {p["layer"]: p["texture"] for p in patches}
        assert layers["normal"] == r["normal"]
        assert layers.get("tumor", "") == r["tumour"]
        for p in patches:
            b = blocks[(p["texture"], int(p["block"]))]
            x0, y0, x1, y1 = (int(p[k]) for k in ("x0", "y0", "x1", "y1"))
            assert b["cohort"] == r["cohort"], (r["slide_id"], p)
            assert b["x0"] <= x0 < x1 <= b["x1"] and b["y0"] <= y0 < y1 <= b["y1"], p
            seen[r["cohort"]].add((p["texture"], int(p["block"])))
    assert seen[DEVELOPMENT] and seen[HELD_OUT] and not seen[DEVELOPMENT] & seen[HELD_OUT]
    by_cohort = {c: [r for r in records if r["cohort"] == c] for c in (DEVELOPMENT, HELD_OUT)}
    for key in ("slide_id", "case_id", "site"):
        dev, held = ({r[key] for r in rows} for rows in by_cohort.values())
        assert dev and held and not dev & held, key
    with open(tiny_cohorts / "labels_heldout.csv") as f:
        split = {r["slide_id"]: r["split"] for r in csv.DictReader(f)}
    assert split == {
        r["slide_id"]: "train" if r["cohort"] == DEVELOPMENT else "test" for r in records
    }


def test_held_out_plans_spread_textures_over_their_own_patients_and_sites():
    dev, held = plan_cohort(32, seed=0), plan_cohort(16, seed=0, cohort=HELD_OUT)
    assert all(p.slide_id.startswith("held_") and p.site in {"E", "F"} for p in held)
    assert not {p.case_id for p in dev} & {p.case_id for p in held}
    for plans in (dev, held):
        tumours = [TEXTURES[p.tumour].tissue for p in plans if p.label == "tumor"]
        counts = np.unique(tumours, return_counts=True)[1]
        assert len(counts) == 4 and counts.max() - counts.min() <= 1  # by slide count
        assert all(p.tumour == "" for p in plans if p.label == "normal")
        assert len({p.normal for p in plans}) == 5


def test_tissue_tile_labels_and_the_held_out_split(tiny_cohorts_prep, tiny_cohorts):
    records = {r["slide_id"]: r for r in _records(tiny_cohorts)}
    cv = tile_labels(tiny_cohorts_prep / "coords", tiny_cohorts, classes="tissue")
    assert {records[r["slide_id"]]["cohort"] for r in cv} == {DEVELOPMENT}
    assert "split" not in cv[0]
    held = tile_labels(
        tiny_cohorts_prep / "coords", tiny_cohorts, classes="tissue", test="held-out"
    )
    assert {r["split"] for r in held} == {"train", "test"}
    for r in held:
        facts = records[r["slide_id"]]
        assert r["split"] == ("train" if facts["cohort"] == DEVELOPMENT else "test")
        assert r["label"] in {facts["normal_tissue"], facts["tumour_tissue"]}
        assert r["label"] in TISSUE_CLASSES and r["case_id"] == facts["case_id"]
    tumour = tile_labels(tiny_cohorts_prep / "coords", tiny_cohorts, test="held-out")
    tumour_keys = {(r["slide_id"], r["index"]) for r in tumour if r["label"] == "tumor"}
    tissue_tumour = {
        (r["slide_id"], r["index"])
        for r in held
        if r["label"] == records[r["slide_id"]]["tumour_tissue"]
    }
    assert tumour_keys == tissue_tumour  # the same tiles, named by class
