"""``cpath benchmark-data``: miniature copies of each public benchmark as its authors lay it
out (real H&E pixels cropped from a cached TCGA tile) turned into the folders that
``cpath evaluate`` reads, with the official split, groups and dataset.json."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ConfigError, PipelineError
from pipeline.eval import benchmark_data as bd
from pipeline.eval.benchmark_data import BenchmarkDataConfig, data_resolution, prepare, run
from pipeline.eval.tiles import read_tile_set

CACHE = Path(__file__).resolve().parents[2] / "data" / "cache"


@pytest.fixture(scope="module")
def he() -> np.ndarray:
    """A real H&E tile (512 x 512 RGB), or noise where the cache lacks it."""
    from pipeline.data.sources import fetch_source

    try:
        with Image.open(fetch_source("tcga_lung", CACHE)) as im:
            return np.asarray(im.convert("RGB")).copy()
    except PipelineError:
        return np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)


def crop(he: np.ndarray, i: int, size: int = 16) -> np.ndarray:
    """The ``i``-th distinct ``size`` x ``size`` crop of ``he``."""
    per_row = he.shape[1] // size
    y, x = divmod(i % (per_row * (he.shape[0] // size)), per_row)
    return he[y * size : (y + 1) * size, x * size : (x + 1) * size]


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def split_of(tiles, out: Path) -> dict[str, tuple[str, str]]:
    """``{file name: (split, label)}`` as ``read_tile_set`` reads a prepared folder."""
    return {
        Path(s).name: (str(sp), str(lab))
        for (s, _), sp, lab in zip(tiles.source, tiles.split, tiles.labels, strict=True)
    }


def groups_csv(out: Path) -> dict[str, str]:
    with open(out / "groups.csv", newline="") as f:
        return {r["image"]: r["group"] for r in csv.DictReader(f)}


def cfg(name: str, source: Path, out: Path, **kw) -> BenchmarkDataConfig:
    return BenchmarkDataConfig(name=name, source=source, out=out, progress=False, **kw)


# ---------------------------------------------------------------- CRC-100K


@pytest.fixture
def crc(tmp_path, he) -> Path:
    src = tmp_path / "crc"
    for c_i, c in enumerate(bd.CRC_CLASSES):
        for k in range(2):
            save(src / "NCT-CRC-HE-100K" / c / f"{c}-TRAIN{k}.tif", crop(he, 10 * c_i + k))
        save(src / "CRC-VAL-HE-7K" / c / f"{c}-VAL0.tif", crop(he, 10 * c_i + 5))
    (src / "CRC-VAL-HE-7K" / "ADI" / "Thumbs.db").write_text("not an image")
    return src


def test_crc_folder_roles_links_dataset_json_and_rerun(crc, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert run(cfg("crc-100k", crc, out)) == 0
    tiles = read_tile_set(out)
    seen = split_of(tiles, out)
    assert len(seen) == 27
    for name, (role, label) in seen.items():
        assert role == ("train" if "TRAIN" in name else "test")
        assert name.startswith(label + "-")
    image = out / "test" / "MUS" / "MUS-VAL0.tif"
    assert image.is_symlink() and image.resolve() == (crc / "CRC-VAL-HE-7K/MUS/MUS-VAL0.tif")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["counts"]["train"] == {c: 2 for c in bd.CRC_CLASSES}
    assert meta["counts"]["test"] == {c: 1 for c in bd.CRC_CLASSES}
    assert (meta["mpp"], meta["image_px"], meta["groups"]) == (0.5, [224, 224], None)
    assert meta["source"] == str(crc.resolve()) and meta["layout_version"] == bd.LAYOUT_VERSION
    assert not (out / "groups.csv").exists() and not out.with_name("prepared.partial").exists()

    before = (out / "dataset.json").stat().st_mtime_ns
    capsys.readouterr()
    assert run(cfg("crc-100k", crc, out)) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "dataset.json").stat().st_mtime_ns == before
    with pytest.raises(PipelineError, match="already holds crc-100k"):
        run(cfg("crc-100k", crc, out, link="copy"))


def test_crc_copies_and_nonorm_train_set(crc, tmp_path):
    (crc / "NCT-CRC-HE-100K").rename(crc / "NCT-CRC-HE-100K-NONORM")
    out = tmp_path / "copied"
    meta = prepare(cfg("crc-100k", crc, out, link="copy"))
    image = out / "train" / "TUM" / "TUM-TRAIN1.tif"
    assert not image.is_symlink()
    assert image.read_bytes() == (crc / "NCT-CRC-HE-100K-NONORM/TUM/TUM-TRAIN1.tif").read_bytes()
    assert meta["train"] == "NCT-CRC-HE-100K-NONORM"


def test_crc_incomplete_source_names_the_missing_folder(crc, tmp_path):
    for f in (crc / "CRC-VAL-HE-7K" / "STR").iterdir():
        f.unlink()
    (crc / "CRC-VAL-HE-7K" / "STR").rmdir()
    with pytest.raises(PipelineError, match=r"CRC-VAL-HE-7K/STR not found.*zenodo"):
        run(cfg("crc-100k", crc, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="one of crc-100k"):
        run(cfg("crc100k", crc, tmp_path / "out"))


# ---------------------------------------------------------------- MHIST


def test_mhist_split_is_the_partition_column(tmp_path, he):
    src = tmp_path / "mhist"
    rows = [
        ("MHIST_aaa.png", "SSA", 6, "train"),
        ("MHIST_aab.png", "HP", 0, "test"),
        ("MHIST_aac.png", "HP", 1, "train"),
        ("MHIST_aad.png", "SSA", 7, "test"),
        ("MHIST_aae.png", "HP", 2, "train"),
        ("MHIST_aaf.png", "SSA", 5, "test"),
    ]
    for i, (name, *_rest) in enumerate(rows):
        save(src / "images" / name, crop(he, 40 + i))
    with open(src / "annotations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "Image Name",
                "Majority Vote Label",
                "Number of Annotators who Selected SSA (Out of 7)",
                "Partition",
            ]
        )
        w.writerows(rows)
    out = tmp_path / "out"
    meta = prepare(cfg("mhist", src, out))
    seen = split_of(read_tile_set(out), out)
    assert seen == {name: (part, label) for name, label, _, part in rows}
    assert meta["counts"] == {"test": {"HP": 1, "SSA": 2}, "train": {"HP": 2, "SSA": 1}}
    assert meta["mpp_approximate"] is True and meta["mpp"] == 1.25

    (src / "images" / "MHIST_aad.png").unlink()
    with pytest.raises(PipelineError, match="MHIST_aad.png not found.*bmirds"):
        prepare(cfg("mhist", src, tmp_path / "again"))


# ---------------------------------------------------------------- BACH


BACH_PREFIX = {"Benign": "b", "InSitu": "is", "Invasive": "iv", "Normal": "n"}


@pytest.fixture
def bach(tmp_path, he) -> Path:
    photos = tmp_path / "bach" / "ICIAR2018_BACH_Challenge" / "Photos"
    tile = crop(he, 3, 4)
    for c, prefix in BACH_PREFIX.items():
        (photos / c).mkdir(parents=True)
        for k in range(1, 101):
            Image.fromarray(tile).save(photos / c / f"{prefix}{k:03d}.tif")
    (photos / "microscopy_ground_truth.csv").write_text("b001.tif,Benign\n")
    return tmp_path / "bach"


def test_bach_split_is_evas_index_ranges(bach, tmp_path):
    out = tmp_path / "out"
    meta = prepare(cfg("bach", bach, out))
    seen = split_of(read_tile_set(out), out)
    # eva: train [0,41) [59,60) [90,139) [169,240) [258,260) [273,345) [368,400), by class
    # (Benign 0-99, InSitu 100-199, Invasive 200-299, Normal 300-399), then file name
    expected = {
        "b001.tif": "train",
        "b041.tif": "train",
        "b042.tif": "test",
        "b059.tif": "test",
        "b060.tif": "train",
        "b061.tif": "test",
        "b090.tif": "test",
        "b091.tif": "train",
        "is039.tif": "train",
        "is040.tif": "test",
        "is069.tif": "test",
        "is070.tif": "train",
        "iv040.tif": "train",
        "iv041.tif": "test",
        "iv059.tif": "train",
        "iv060.tif": "train",
        "iv061.tif": "test",
        "iv073.tif": "test",
        "iv074.tif": "train",
        "n045.tif": "train",
        "n046.tif": "test",
        "n068.tif": "test",
        "n069.tif": "train",
        "n100.tif": "train",
    }
    assert {n: seen[n][0] for n in expected} == expected
    assert seen["is040.tif"][1] == "InSitu" and seen["n100.tif"][1] == "Normal"
    assert meta["counts"] == {
        "train": {"Benign": 52, "InSitu": 70, "Invasive": 69, "Normal": 77},
        "test": {"Benign": 48, "InSitu": 30, "Invasive": 31, "Normal": 23},
    }
    assert (meta["mpp"], meta["image_px"]) == (0.42, [2048, 1536])


def test_bach_needs_all_400_photos(bach, tmp_path):
    (bach / "ICIAR2018_BACH_Challenge/Photos/Normal/n050.tif").unlink()
    with pytest.raises(PipelineError, match="399 photos.*400 labelled"):
        prepare(cfg("bach", bach, tmp_path / "out"))


# ---------------------------------------------------------------- PCam


@pytest.fixture
def pcam(tmp_path, he) -> tuple[Path, dict]:
    src = tmp_path / "pcam"
    src.mkdir()
    arrays = {}
    for s_i, (role, n) in enumerate((("train", 10), ("valid", 3), ("test", 6))):
        x = np.stack([crop(he, 5 * s_i + i, 96) for i in range(n)])
        y = (np.arange(n) % 2 == (s_i % 2)).astype(np.uint8).reshape(n, 1, 1, 1)
        with h5py.File(src / f"camelyonpatch_level_2_split_{role}_x.h5", "w") as f:
            f["x"] = x
        with h5py.File(src / f"camelyonpatch_level_2_split_{role}_y.h5", "w") as f:
            f["y"] = y
        wsi = [f"{role}_slide_{i // 3}" for i in range(n)]
        with open(src / f"camelyonpatch_level_2_split_{role}_meta.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["", "coord_y", "coord_x", "tumor_patch", "center_tumor_patch", "wsi"])
            w.writerows(
                [i, 0, 0, bool(y[i, 0, 0, 0]), bool(y[i, 0, 0, 0]), wsi[i]] for i in range(n)
            )
        arrays[role] = (x, y.reshape(n), wsi)
    return src, arrays


def test_pcam_rows_become_identical_pngs_in_chunks_and_resume(pcam, tmp_path, monkeypatch):
    src, arrays = pcam
    monkeypatch.setattr(bd, "PCAM_CHUNK", 4)
    out = tmp_path / "out"
    calls = {"n": 0}
    real_save = Image.Image.save

    def failing_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 6:
            raise KeyboardInterrupt
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg("pcam", src, out))
    assert not out.exists() and (tmp_path / "out.partial" / ".chunks" / "train-000000").is_file()
    counted = {"n": 0}

    def counting_save(self, *args, **kwargs):
        counted["n"] += 1
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", counting_save)
    meta = prepare(cfg("pcam", src, out))
    assert counted["n"] == 19 - 4  # the first chunk of train was done
    for role, (x, y, _) in arrays.items():
        for i in range(len(y)):
            png = out / role / ("tumour" if y[i] else "normal") / bd.pcam_name(role, i)
            with Image.open(png) as im:
                assert np.array_equal(np.asarray(im), x[i])
    assert meta["counts"]["valid"] == {"normal": 2, "tumour": 1}
    assert meta["counts"]["train"] == {"normal": 5, "tumour": 5}
    groups = groups_csv(out)
    assert groups["test/normal/" + bd.pcam_name("test", 3)] == "test_slide_1"
    assert len(groups) == 19 and not (out / ".chunks").exists()

    tiles = read_tile_set(out, groups=out / "groups.csv")
    assert len(tiles) == 16 and set(tiles.split) == {"train", "test"}  # valid/ is not read
    seen = split_of(tiles, out)
    assert seen[bd.pcam_name("test", 0)] == ("test", "tumour" if arrays["test"][1][0] else "normal")
    assert set(tiles.groups[tiles.split == "train"]) == {f"train_slide_{k}" for k in range(4)}


def test_pcam_gzipped_files_say_to_decompress(pcam, tmp_path):
    src, _ = pcam
    x = src / "camelyonpatch_level_2_split_test_x.h5"
    x.rename(x.with_suffix(".h5.gz"))
    with pytest.raises(PipelineError, match="gunzip"):
        prepare(cfg("pcam", src, tmp_path / "out"))


# ---------------------------------------------------------------- BreakHis


PATIENTS = {  # (benign or malignant, subtype, patient id): fold-1 side
    ("B", "A", "14-22549AB"): "train",
    ("B", "F", "14-9133"): "train",
    ("B", "PT", "14-21998AB"): "train",
    ("B", "TA", "14-3411F"): "test",
    ("M", "DC", "14-2773"): "train",
    ("M", "LC", "14-12204"): "test",
    ("M", "MC", "14-13418DE"): "train",
    ("M", "PC", "14-9146"): "test",
}


@pytest.fixture
def breakhis(tmp_path, he) -> Path:
    src = tmp_path / "breakhis"
    breast = src / "BreaKHis_v1" / "histology_slides" / "breast"
    lines = []
    for p_i, ((bm, sub, pid), side) in enumerate(PATIENTS.items()):
        folder = breast / ("benign" if bm == "B" else "malignant") / "SOB"
        folder = folder / bd.BREAKHIS_SUBTYPES[sub] / f"SOB_{bm}_{sub}_{pid}"
        for mag, n in (("40", 2), ("400", 1)):
            for k in range(1, n + 1):
                name = f"SOB_{bm}_{sub}-{pid}-{mag}-{k:03d}.png"
                save(folder / f"{mag}X" / name, crop(he, 10 * p_i + k, 8))
                lines.append(f"{name}|{mag}|1|{side}")
    (src / "dsfold1.txt").write_text("\n".join(lines) + "\n")
    return src


def test_breakhis_official_fold_patients_groups_and_labels(breakhis, tmp_path):
    out = tmp_path / "out"
    meta = prepare(cfg("breakhis", breakhis, out, fold=1))
    tiles = read_tile_set(out, groups=out / "groups.csv")
    seen = split_of(tiles, out)
    assert len(seen) == 24
    fold = dict(line.split("|")[0::3] for line in (breakhis / "dsfold1.txt").read_text().split())
    assert {n: role for n, (role, _) in seen.items()} == fold
    for name, (_, label) in seen.items():
        assert label == ("benign" if name.startswith("SOB_B_") else "malignant")
    sides: dict[str, set] = {}
    for group, role in zip(tiles.groups, tiles.split, strict=True):
        sides.setdefault(str(group), set()).add(str(role))
    assert {g: s for g, s in sides.items() if len(s) > 1} == {}
    assert set(sides) == {pid for _, _, pid in PATIENTS}
    assert groups_csv(out)["test/benign/SOB_B_TA-14-3411F-400-001.png"] == "14-3411F"
    assert meta["counts"] == {
        "test": {"benign": 3, "malignant": 6},
        "train": {"benign": 9, "malignant": 6},
    }
    assert meta["mpp"] is None and meta["fold"] == 1 and meta["groups_by"] == "patient"


def test_breakhis_subtypes_one_magnification(breakhis, tmp_path):
    out = tmp_path / "out"
    meta = prepare(cfg("breakhis", breakhis, out, labels="subtype", magnification="400X"))
    assert meta["n_images"] == 8 and meta["mpp"] == bd.BREAKHIS_MPP["400X"]
    assert sorted(meta["classes"]) == sorted(bd.BREAKHIS_SUBTYPES.values())
    assert (out / "test" / "papillary_carcinoma" / "SOB_M_PC-14-9146-400-001.png").is_symlink()


def test_breakhis_without_fold_file_fails_or_splits_by_patient(breakhis, tmp_path):
    (breakhis / "dsfold1.txt").unlink()
    with pytest.raises(PipelineError, match=r"dsfold1.txt not found.*--split patients"):
        prepare(cfg("breakhis", breakhis, tmp_path / "out"))
    a = prepare(cfg("breakhis", breakhis, tmp_path / "a", split="patients"))
    b = prepare(cfg("breakhis", breakhis, tmp_path / "b", split="patients"))
    assert a["counts"] == b["counts"] and "deterministic" in a["split_source"]
    groups = groups_csv(tmp_path / "a")
    assert groups == groups_csv(tmp_path / "b")
    sides: dict[str, set] = {}
    for image, group in groups.items():
        sides.setdefault(group, set()).add(image.split("/")[0])
    assert all(len(s) == 1 for s in sides.values())
    by_side = {s: {g for g, ss in sides.items() if s in ss} for s in ("train", "test")}
    assert len(by_side["train"]) == 6 and len(by_side["test"]) == 2  # 70% of 4, per class


def test_breakhis_fold_with_a_patient_on_both_sides_is_recorded(breakhis, tmp_path, caplog):
    fold = breakhis / "dsfold1.txt"
    fold.write_text(
        fold.read_text().replace(
            "SOB_B_A-14-22549AB-400-001.png|400|1|train",
            "SOB_B_A-14-22549AB-400-001.png|400|1|test",
        )
    )
    with caplog.at_level(logging.WARNING):
        meta = prepare(cfg("breakhis", breakhis, tmp_path / "out"))
    assert meta["patients_on_both_sides"] == ["14-22549AB"] and "both sides" in caplog.text


# ---------------------------------------------------------------- evaluation


def test_resolution_per_zoo_encoder(crc, tmp_path, caplog):
    out = tmp_path / "out"
    prepare(cfg("crc-100k", crc, out))
    encoders = {"u": "uni2-h", "v": "virchow2:cls", "mine": "runs/pretrain/encoder"}
    res = data_resolution(out, encoders)
    assert res["mpp"] == 0.5 and set(res["encoders"]) == {"u", "v"}
    assert res["encoders"]["u"]["recommended_mpp"] == 0.5
    assert res["encoders"]["u"]["effective_mpp"] == pytest.approx(0.5)
    assert res["encoders"]["v"]["recommended_mpp"] is None
    meta = json.loads((out / "dataset.json").read_text())
    meta.update(mpp=0.42, image_px=[2048, 1536])  # BACH photos, resized whole to 224 px
    (out / "dataset.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        res = data_resolution(out, {"u": "uni2-h"})
    assert res["encoders"]["u"]["effective_mpp"] == pytest.approx(0.42 * 2048 / 224, abs=1e-3)
    assert res["encoders"]["u"]["effective_mpp_xy"][1] == pytest.approx(0.42 * 1536 / 224, 1e-3)
    assert "more than 2x" in caplog.text
    assert data_resolution(tmp_path, encoders) is None


def test_report_names_the_data_and_encoder_mpp(crc, tmp_path):
    from pipeline.eval import report

    out = tmp_path / "out"
    prepare(cfg("crc-100k", crc, out))
    r = {"kind": "tile", "n_items": 27, "columns": {}, "scores": {}}
    r["resolution"] = data_resolution(out, {"u": "uni2-h"})
    assert "at 0.5 um/px" in report._facts(r)
    title, header, rows = report._task_tables("crc", r)[-1]
    assert "resolution" in title and rows == [["u", "uni2-h", "0.500", "0.500"]]


def test_stage_is_registered():
    from pipeline.stages import STAGES

    config, runner = STAGES["benchmark-data"].load()
    assert config is BenchmarkDataConfig and runner is run
