import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.wsi.coords import read_coords, write_coords
from pipeline.wsi.preprocess import (
    TISSUE_RULES,
    PreprocessConfig,
    preprocess,
    process_slide,
    run,
)
from pipeline.wsi.reader import Slide
from pipeline.wsi.slides import list_slides, parse_shard, shard_slides
from pipeline.wsi.tissue import TissueConfig, make_tissue_detector
from tests.wsi.conftest import first_slide


def _manifest(out, name="manifest.csv"):
    with open(out / name) as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_cohort, broken_dir):
    """The tiny cohort and the broken files in one folder, preprocessed at 0.5 mpp."""
    slides = tmp_path_factory.mktemp("slides")
    for p in (tiny_cohort / "slides").glob("*.svs"):
        os.symlink(p, slides / p.name)
    for p in broken_dir.iterdir():
        shutil.copy(p, slides / p.name)
    out = tmp_path_factory.mktemp("prep")
    cfg = PreprocessConfig(slides=str(slides), out=out, tile_size=128, workers=2)
    code = run(cfg)
    return {"out": out, "slides": slides, "code": code, "cfg": cfg}


def test_bad_slides_fail_alone_with_clear_errors(prepared):
    rows = _manifest(prepared["out"])
    assert prepared["code"] == 1  # a failed slide makes the run exit non-zero
    expected = {
        "truncated": "truncated or corrupt",
        "notes": "not a slide format",
        "empty": "empty",
        "blank": "no tissue found",
        "no_mpp": "--level0-mpp",
    }
    for slide_id, message in expected.items():
        assert rows[slide_id]["status"] == "failed"
        assert message in rows[slide_id]["error"], rows[slide_id]["error"]
        assert not (prepared["out"] / "coords" / f"{slide_id}.h5").exists()
    demo = [r for k, r in rows.items() if k.startswith("demo_")]
    assert len(demo) == 6 and all(r["status"] == "ok" and int(r["n_tiles"]) > 0 for r in demo)
    assert {r["mpp_source"] for r in demo} == {"aperio-mpp"}
    assert (prepared["out"] / "config.yaml").exists()


def test_tiles_lie_on_tissue_and_match_the_ground_truth(prepared, tiny_cohort):
    from skimage.morphology import remove_small_holes

    records = json.loads((tiny_cohort / "cohort.json").read_text())["slides"]
    for r in records:
        table = read_coords(prepared["out"] / "coords" / f"{r['slide_id']}.h5")
        tissue = (
            np.asarray(Image.open(tiny_cohort / "ground_truth" / f"{r['slide_id']}_tissue.png")) > 0
        )
        pen = np.asarray(Image.open(tiny_cohort / "ground_truth" / f"{r['slide_id']}_pen.png")) > 0
        ds = r["mask_downsample"]
        # tissue detection fills holes under max_hole_um2 (50,000 um^2) by design
        hole = TissueConfig().max_hole_um2 / (r["mpp"] * ds) ** 2  # in mask px
        tissue = remove_small_holes(tissue, max_size=int(hole))
        size = table.patch_size_level0 / ds
        shares, ink = [], []
        for x, y in table.coords / ds:
            box = np.s_[int(y) : int(np.ceil(y + size)), int(x) : int(np.ceil(x + size))]
            shares.append(tissue[box].mean())
            ink.append(pen[box].mean())
        assert np.mean(shares) > 0.8 and np.min(shares) > 0.25, r["slide_id"]
        assert max(ink) < 0.1, f"{r['slide_id']}: a tile is {max(ink):.0%} pen ink"
        assert table.tissue_fraction.min() >= 0.5


def _detection_iou(slide_path: Path, record: dict, truth: Path, cfg: TissueConfig) -> tuple:
    """Tissue detection as preprocess runs it (:meth:`Slide.detection_thumbnail`) against
    the ground truth: IoU at the truth's pixels (each sampling the detection mask at its
    centre, by geometry), pen-ink pixels taken as tissue, and the detection's um per px."""
    with Slide(slide_path) as slide:
        thumb = slide.detection_thumbnail(cfg.mpp)
        mpp = slide.mpp * slide.dimensions[0] / thumb.shape[1]
        width, height = slide.dimensions
    mask = make_tissue_detector(cfg)(thumb, mpp)
    gt = np.asarray(Image.open(truth / f"{record['slide_id']}_tissue.png")) > 0
    pen = np.asarray(Image.open(truth / f"{record['slide_id']}_pen.png")) > 0
    ds = record["mask_downsample"]  # level-0 px per truth px
    ys = ((np.arange(gt.shape[0]) + 0.5) * ds * mask.shape[0] / height).astype(int)
    xs = ((np.arange(gt.shape[1]) + 0.5) * ds * mask.shape[1] / width).astype(int)
    up = mask[np.ix_(ys.clip(max=mask.shape[0] - 1), xs.clip(max=mask.shape[1] - 1))]
    return (up & gt).sum() / (up | gt).sum(), int((up & pen).sum()), mpp


def test_tissue_detection_iou_and_pen_exclusion_on_every_demo_slide(tiny_cohort):
    """At 8 um/px on the tiny cohort (slides a third of the demo's size: at 16 um/px their
    masks are 35-120 px across and lose 0.03-0.05 IoU to pixel quantisation alone)."""
    cfg = TissueConfig(mpp=8.0)
    for r in json.loads((tiny_cohort / "cohort.json").read_text())["slides"]:
        truth = tiny_cohort / "ground_truth"
        iou, pen, mpp = _detection_iou(tiny_cohort / r["path"], r, truth, cfg)
        assert 4.0 <= mpp <= 10.0, (r["slide_id"], mpp)
        assert iou >= 0.9, f"{r['slide_id']} at {mpp:.1f} um/px: tissue IoU {iou:.3f}"
        assert pen == 0, f"{r['slide_id']}: pen ink kept as tissue"


@pytest.fixture(scope="module")
def full_size_slides(tmp_path_factory, sources) -> tuple[Path, list[dict]]:
    """Three slides of the default demo cohort at full size: demo_029 (faint glandular
    tissue beside strongly stained tumour, 0.25 mpp), demo_015 (pale tissue around a
    tumour, 0.5 mpp) and demo_000."""
    from pipeline.data.demo import generate_slide, load_textures, plan_cohort
    from tests.conftest import CACHE

    plans = {p.slide_id: p for p in plan_cohort(32, 0)}
    out = tmp_path_factory.mktemp("full_size")
    textures = load_textures(CACHE)
    return out, [
        generate_slide(plans[s], textures, out) for s in ("demo_029", "demo_015", "demo_000")
    ]


def test_default_detection_on_the_16um_level_keeps_faint_tissue(full_size_slides):
    """The default (the level nearest 16 um/px, read as it is) on full-size demo slides:
    IoU >= 0.9 and no pen. A single Otsu threshold finds 0.22 of demo_029 (it splits faint
    from strongly stained tissue) and 0.84 of demo_015 at 16 um/px."""
    out, records = full_size_slides
    for r in records:
        iou, pen, mpp = _detection_iou(out / r["path"], r, out / "ground_truth", TissueConfig())
        assert 8.0 <= mpp <= 20.0, (r["slide_id"], mpp)
        assert iou >= 0.9, f"{r['slide_id']} at {mpp:.1f} um/px: tissue IoU {iou:.3f}"
        assert pen == 0, f"{r['slide_id']}: pen ink kept as tissue"
    without, _, _ = _detection_iou(
        out / records[0]["path"], records[0], out / "ground_truth", TissueConfig(pale_tissue=False)
    )
    assert without < 0.5  # the faint tissue is lost without the second threshold


def test_coords_attributes_on_a_quarter_mpp_slide(prepared, tiny_cohort):
    records = json.loads((tiny_cohort / "cohort.json").read_text())["slides"]
    r = next(r for r in records if r["mpp"] == 0.25)
    table = read_coords(prepared["out"] / "coords" / f"{r['slide_id']}.h5")
    a = table.attrs
    assert (a["target_mpp"], a["level0_mpp"], a["patch_size"]) == (0.5, 0.25, 128)
    assert (a["patch_size_level0"], a["patch_level"], a["overlap"]) == (256, 0, 0)
    assert (a["level0_width"], a["level0_height"]) == (r["width"], r["height"])
    assert a["mpp_source"] == "aperio-mpp" and a["slide_id"] == r["slide_id"]
    assert a["tissue_method"] == "hsv_otsu" and a["package_version"]
    assert np.all(table.coords % 256 == 0)  # the 0.5-mpp grid in level-0 px of a 0.25 slide
    tissue_json = json.loads((prepared["out"] / "tissue" / f"{r['slide_id']}.geojson").read_text())
    assert tissue_json["type"] == "FeatureCollection" and tissue_json["features"]
    ring = np.array(tissue_json["features"][0]["geometry"]["coordinates"][0])
    assert ring[:, 0].max() <= r["width"] + 32 and ring[:, 1].max() <= r["height"] + 32
    thumb = Image.open(prepared["out"] / "thumbnails" / f"{r['slide_id']}.jpg")
    assert max(thumb.size) <= 1024


def test_rerun_skips_done_and_redoes_changed_parameters(prepared):
    out, cfg = prepared["out"], prepared["cfg"]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "coords").glob("*.h5")}
    rows = {r["slide_id"]: r for r in preprocess(cfg, progress=False)}
    assert all(r["status"] == "skipped" for k, r in rows.items() if k.startswith("demo_"))
    assert all(r["status"] == "failed" for k, r in rows.items() if not k.startswith("demo_"))
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "coords").glob("*.h5")}
    changed = PreprocessConfig(slides=cfg.slides, out=out, tile_size=96)
    rows = {r["slide_id"]: r for r in preprocess(changed, progress=False)}
    assert all(r["status"] == "ok" for k, r in rows.items() if k.startswith("demo_"))
    assert read_coords(out / "coords" / "demo_000.h5").patch_size == 96


def test_killed_run_resumes_without_partial_files(tmp_path, tiny_cohort):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(8):  # enough work that the run is still going when it is killed
        for p in sorted((tiny_cohort / "slides").glob("*.svs")):
            os.symlink(p, slides / f"copy{i}_{p.name}")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "preprocess",
        "--slides",
        str(slides),
        "--out",
        str(out),
        "--workers",
        "1",
        "--tile-size",
        "128",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "coords").glob("*.h5"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((out / "coords").glob("*.h5"))
    assert 3 <= len(done) < 48, "the run must be killed part-way"
    for path in done:  # everything under a final name is complete
        assert len(read_coords(path)) == read_coords(path).attrs["n_tiles"] > 0
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = _manifest(out)
    assert len(rows) == 48 and all(r["status"] in {"ok", "skipped"} for r in rows.values())
    assert {r["slide_id"] for r in rows.values() if r["status"] == "skipped"} == {
        p.stem for p in done
    }
    assert not list(out.rglob("*.tmp"))


def test_shards_partition_the_slides(tmp_path, tiny_cohort):
    entries = list_slides(tiny_cohort / "slides")
    parts = [shard_slides(entries, i, 3) for i in range(3)]
    assert sorted(e.slide_id for p in parts for e in p) == [e.slide_id for e in entries]
    assert parse_shard(
        None,
        {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "4"},
    ) == (1, 3)
    assert parse_shard(None, {"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    assert parse_shard("2/4", {"RANK": "1", "WORLD_SIZE": "2"}) == (2, 4)
    for i in range(2):
        cfg = PreprocessConfig(slides=str(tiny_cohort / "slides"), out=tmp_path, shard=f"{i}/2")
        preprocess(cfg, progress=False)
    a = _manifest(tmp_path, "manifest.shard-0-of-2.csv")
    b = _manifest(tmp_path, "manifest.shard-1-of-2.csv")
    assert not set(a) & set(b) and len(a) + len(b) == len(entries)
    assert len(list((tmp_path / "coords").glob("*.h5"))) == len(entries)


def test_csv_list_supplies_mpp_and_ids(tmp_path, metadata_files, cmu_svs, caplog):
    listing = tmp_path / "slides.csv"
    listing.write_text(
        f"path,slide_id,mpp\n{metadata_files['png']},carcinoma,0.25\n"
        f"{cmu_svs},cmu,\n{cmu_svs},cmu_fixed,0.25\n"
    )
    cfg = load_config(
        PreprocessConfig,
        slides=str(listing),
        out=str(tmp_path / "o"),
        tile_size=128,
        min_tissue=0.3,
    )
    with caplog.at_level(logging.WARNING, logger="pipeline.wsi.preprocess"):
        rows = {r["slide_id"]: r for r in preprocess(cfg, progress=False)}
    assert rows["carcinoma"]["status"] == "ok" and rows["carcinoma"]["mpp_source"] == "override"
    assert rows["cmu"]["status"] == "ok" and rows["cmu"]["mpp_source"] == "aperio-mpp"
    assert float(rows["cmu"]["level0_mpp"]) == pytest.approx(0.499)
    table = read_coords(tmp_path / "o" / "coords" / "carcinoma.h5")
    assert table.patch_size_level0 == 256  # 128 px at 0.5 mpp from a 0.25-mpp image
    # the CSV's mpp overrides the metadata's 0.499 of the same slide, with a warning
    assert rows["cmu_fixed"]["mpp_source"] == "override"
    assert float(rows["cmu_fixed"]["level0_mpp"]) == 0.25
    assert read_coords(tmp_path / "o" / "coords" / "cmu_fixed.h5").patch_size_level0 == 256
    assert read_coords(tmp_path / "o" / "coords" / "cmu.h5").patch_size_level0 == 128
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cmu_fixed" in warnings[0], warnings
    assert "0.25 overrides 0.499" in warnings[0] and "0.25 is used" in warnings[0]


def test_config_errors(tmp_path):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="no slides found"):
        preprocess(PreprocessConfig(slides=str(tmp_path / "none" / "*.svs"), out=tmp_path))
    with pytest.raises(ConfigError, match="overlap"):
        preprocess(PreprocessConfig(slides=str(tmp_path), out=tmp_path, overlap=300))
    with pytest.raises(ConfigError, match="unknown --tissue.method"):
        cfg = PreprocessConfig(slides=str(tmp_path), out=tmp_path, tissue=TissueConfig("unet"))
        preprocess(cfg)


def _one_slide_folder(tmp_path, source, names=("cmu",)):
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in names:
        os.symlink(Path(source).resolve(), slides / f"{name}{Path(source).suffix}")
    return slides


def test_foreign_coords_file_is_redone_not_fatal(tmp_path, cmu_svs):
    """A TRIDENT coords file (no target_mpp) where ours would be: the slide is redone."""
    slides = _one_slide_folder(tmp_path, cmu_svs, ("cmu", "other"))
    (tmp_path / "out" / "coords").mkdir(parents=True)
    with h5py.File(tmp_path / "out" / "coords" / "cmu.h5", "w") as f:
        d = f.create_dataset("coords", data=np.zeros((3, 2), np.int64))
        d.attrs.update(
            {"patch_size": 512, "patch_size_level0": 1024, "target_magnification": 20, "overlap": 0}
        )
    (tmp_path / "out" / "coords" / "other.h5").write_bytes(b"truncated")
    cfg = PreprocessConfig(slides=str(slides), out=tmp_path / "out", tile_size=128, min_tissue=0.3)
    rows = {r["slide_id"]: r for r in preprocess(cfg, progress=False)}
    assert rows["cmu"]["status"] == rows["other"]["status"] == "ok"
    assert read_coords(tmp_path / "out" / "coords" / "cmu.h5").target_mpp == 0.5


def test_stale_temporaries_of_this_slide_only_are_removed(tmp_path, cmu_svs):
    slides = _one_slide_folder(tmp_path, cmu_svs, ("S1", "a[1]"))
    out = tmp_path / "out"
    stale = [out / "coords" / ".S1.h5.999.tmp", out / "thumbnails" / ".a[1].jpg.999.tmp"]
    others = [out / "coords" / ".S1.rescan.h5.999.tmp", out / "tissue" / ".S1.x.geojson.9.tmp"]
    for path in stale + others:  # others: slides of another shard or run, still being written
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    cfg = PreprocessConfig(slides=str(slides), out=out, tile_size=128, min_tissue=0.3)
    assert {r["status"] for r in preprocess(cfg, progress=False)} == {"ok"}
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)


def test_rerun_redoes_slides_whose_resolution_or_file_changed(tmp_path, metadata_files, cmu_svs):
    slides = _one_slide_folder(tmp_path, metadata_files["png"], ("he",))
    out = tmp_path / "out"

    def status(level0_mpp, spec=slides):
        cfg = PreprocessConfig(
            slides=str(spec), out=out, tile_size=128, min_tissue=0.3, level0_mpp=level0_mpp
        )
        return [r["status"] for r in preprocess(cfg, progress=False)]

    assert status(0.25) == ["ok"]
    assert status(0.25) == ["skipped"]
    assert status(0.5) == ["ok"]  # a corrected --level0-mpp redoes the slides that used it
    table = read_coords(out / "coords" / "he.h5")
    assert (table.attrs["level0_mpp"], table.patch_size_level0) == (0.5, 128)
    assert status(None) == ["failed"]  # the value it was made with is gone
    other = tmp_path / "elsewhere"
    other.mkdir()
    os.symlink(cmu_svs.resolve(), other / "he.svs")  # another slide with the same id
    assert status(None, other) == ["ok"]
    assert read_coords(out / "coords" / "he.h5").attrs["mpp_source"] == "aperio-mpp"
    assert status(None, other) == ["skipped"]
    assert status(0.3, other) == ["ok"]  # a given mpp overrides the metadata's
    assert read_coords(out / "coords" / "he.h5").attrs["mpp_source"] == "override"
    assert status(None, other) == ["ok"]  # and back to the metadata's when no longer given
    table = read_coords(out / "coords" / "he.h5")
    assert table.attrs["mpp_source"] == "aperio-mpp" and table.attrs["tissue_rules"] == TISSUE_RULES
    # a coords file made by earlier tissue rules (no tissue_rules attribute) is redone
    root = {k: v for k, v in table.attrs.items() if k != "tissue_rules"}
    write_coords(out / "coords" / "he.h5", table.coords, table.tissue_fraction, root)
    assert status(None, other) == ["ok"]
    assert status(None, other) == ["skipped"]


def _process_or_die(entry, cfg):
    """process_slide, except that the worker is killed (as by the OOM killer) on 'crash'."""
    if entry.slide_id == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    return process_slide(entry, cfg)


def test_worker_killed_fails_its_slide_and_the_others_finish(tmp_path, cmu_svs, monkeypatch):
    import pipeline.wsi.preprocess as module

    monkeypatch.setattr(module, "process_slide", _process_or_die)  # by reference in the pool
    slides = _one_slide_folder(tmp_path, cmu_svs, ("a", "crash", "d"))
    out = tmp_path / "out"
    cfg = PreprocessConfig(slides=str(slides), out=out, tile_size=128, min_tissue=0.3, workers=2)
    assert run(cfg) == 1
    rows = _manifest(out)
    assert rows["crash"]["status"] == "failed" and "worker process" in rows["crash"]["error"]
    assert rows["a"]["status"] == rows["d"]["status"] == "ok", rows
    assert sorted(p.stem for p in (out / "coords").glob("*.h5")) == ["a", "d"]


def test_given_level0_mpp_overrides_the_metadata_and_a_new_value_retiles(
    tmp_path, tiny_cohort, caplog
):
    """A slide whose metadata says 0.25 mpp, tiled with --level0-mpp: tiles at the given
    value, a warning when it is more than 5% off, and a changed value re-tiles."""
    source = first_slide(tiny_cohort, site="C")  # 0.25 mpp in its Aperio metadata
    slides = tmp_path / "slides"
    slides.mkdir()
    os.symlink(source, slides / "c.svs")
    out = tmp_path / "out"

    def tile(level0_mpp):
        cfg = PreprocessConfig(slides=str(slides), out=out, tile_size=128, level0_mpp=level0_mpp)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.wsi.preprocess"):
            (row,) = preprocess(cfg, progress=False)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        return row, read_coords(out / "coords" / "c.h5"), warnings

    row, table, warnings = tile(None)
    assert (row["status"], row["mpp_source"], table.patch_size_level0) == ("ok", "aperio-mpp", 256)
    assert warnings == []
    row, table, warnings = tile(0.3)  # 20% off the metadata: used, with a warning
    assert (row["status"], row["mpp_source"], float(row["level0_mpp"])) == ("ok", "override", 0.3)
    assert (table.attrs["level0_mpp"], table.attrs["mpp_source"]) == (0.3, "override")
    assert table.patch_size_level0 == 213  # round(128 * 0.5 / 0.3)
    step = np.diff(np.unique(table.coords[:, 0]))  # the grid at 0.5 mpp of a 0.3-mpp slide
    assert np.abs(step - 128 * 0.5 / 0.3).max() < 1
    assert len(warnings) == 1 and "slide c:" in warnings[0] and str(slides / "c.svs") in warnings[0]
    assert "0.3 overrides 0.25" in warnings[0] and "(aperio-mpp)" in warnings[0]
    assert "0.3 is used" in warnings[0]
    row, _, _ = tile(0.3)
    assert row["status"] == "skipped" and row["mpp_source"] == "override"
    row, table, warnings = tile(0.26)  # a changed value re-tiles; 4% off: no warning
    assert (row["status"], table.attrs["level0_mpp"], table.patch_size_level0) == ("ok", 0.26, 246)
    assert warnings == []
    row, table, _ = tile(None)  # no value given any more: the metadata's again
    assert (row["status"], row["mpp_source"], table.patch_size_level0) == ("ok", "aperio-mpp", 256)


def test_implausible_given_mpp_is_a_config_error(tmp_path, cmu_svs):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="--level0-mpp 4000.0 is not a level-0 resolution"):
        preprocess(PreprocessConfig(slides=str(cmu_svs), out=tmp_path, level0_mpp=4000.0))
    listing = tmp_path / "slides.csv"
    listing.write_text(f"path,mpp\n{cmu_svs},0.5\n{cmu_svs},0\n")
    with pytest.raises(ConfigError, match="line 3: mpp 0 is not a level-0 resolution") as err:
        list_slides(listing)
    assert str(listing) in str(err.value)
