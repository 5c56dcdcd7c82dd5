"""Real slide files of three more formats through `cpath preprocess` and `cpath extract`:
a TCGA Aperio SVS with JPEG 2000 tiles and no mpp, a pyramidal TIFF without a resolution
tag, and a DICOM whole-slide set (a folder is one slide).

The tissue found was checked by eye on the QC thumbnails once (the TCGA section whole, the
prostate core without its lumina and background, the CMU section as in its SVS); the tile
counts below pin it.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pipeline.extract import ExtractConfig
from pipeline.extraction import extract
from pipeline.features import read_features
from pipeline.wsi.coords import read_coords
from pipeline.wsi.preprocess import PreprocessConfig, preprocess
from tests.tiny_encoder import save_tiny_encoder

# 256-px tiles at 0.5 mpp, min tissue 0.5: counts seen when the thumbnails were checked
TILES = {"tcga": (151, 130, 170), "prostate": (68, 58, 78), "cmu_dicom": (33, 28, 38)}


@pytest.fixture(scope="module")
def slides(tmp_path_factory, slide_files):
    folder = tmp_path_factory.mktemp("real_slides")
    shutil.copy(slide_files["tcga_svs"], folder / "tcga.svs")
    shutil.copy(slide_files["prostate_tiff"], folder / "prostate.tiff")
    shutil.copytree(slide_files["cmu_dicom"], folder / "cmu_dicom")
    return folder


def test_slides_without_mpp_fail_with_the_mpp_message_then_tile_with_one(slides, tmp_path):
    out = tmp_path / "prep"
    rows = {
        r["slide_id"]: r
        for r in preprocess(
            PreprocessConfig(slides=str(slides), out=out, thumbnails=True), progress=False
        )
    }
    assert set(rows) == {"tcga", "prostate", "cmu_dicom"}
    for name in ("tcga", "prostate"):
        assert rows[name]["status"] == "failed"
        assert "no resolution (mpp) in the file's metadata" in rows[name]["error"]
        assert "--level0-mpp" in rows[name]["error"]
    assert rows["cmu_dicom"]["status"] == "ok"  # DICOM pixel spacing: 0.499 um

    listing = tmp_path / "slides.csv"
    listing.write_text(
        f"path,slide_id,mpp\n{slides / 'tcga.svs'},tcga,0.5\n"
        f"{slides / 'prostate.tiff'},prostate,0.5\n{slides / 'cmu_dicom'},cmu_dicom,\n"
    )
    rows = {
        r["slide_id"]: r
        for r in preprocess(PreprocessConfig(slides=str(listing), out=out), progress=False)
    }
    assert [rows[n]["status"] for n in ("tcga", "prostate", "cmu_dicom")] == ["ok", "ok", "skipped"]
    for name, (seen, low, high) in TILES.items():
        table = read_coords(out / "coords" / f"{name}.h5")
        assert low <= len(table) <= high, (name, len(table), seen)
    dicom = read_coords(out / "coords" / "cmu_dicom.h5").attrs
    assert (
        dicom["level0_mpp"] == pytest.approx(0.499, abs=1e-3) and dicom["mpp_source"] != "override"
    )
    assert read_coords(out / "coords" / "tcga.h5").attrs["mpp_source"] == "override"

    encoder = save_tiny_encoder(tmp_path / "encoder")
    done = extract(
        ExtractConfig(
            coords=out / "coords",
            encoder=str(encoder),
            out=tmp_path / "feats",
            batch_size=64,
            workers=0,
            precision="fp32",
            progress=False,
        )
    )
    assert {r["slide_id"]: r["status"] for r in done} == dict.fromkeys(TILES, "done")
    for name in TILES:
        feats, coords, attrs = read_features(tmp_path / "feats" / f"{name}.h5")
        table = read_coords(out / "coords" / f"{name}.h5")
        assert feats.shape == (len(table), 48) and np.isfinite(feats).all()
        np.testing.assert_array_equal(coords, table.coords)
        assert feats.std(0).mean() > 0  # real, varied tiles, not blank reads
