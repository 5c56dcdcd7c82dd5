import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline.errors import SlideError
from pipeline.wsi.reader import Slide, resolve_mpp
from tests.wsi.conftest import first_slide


def test_mpp_from_aperio_metadata_of_the_real_cmu_svs(cmu_svs):
    with Slide(cmu_svs) as slide:
        assert slide.vendor == "aperio"
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "aperio-mpp"


@pytest.mark.parametrize(
    "kind,mpp,source",
    [
        ("generic", 0.25, "tiff-resolution"),  # OpenSlide generic-tiff, resolution tags
        ("stripped", 0.5, "tiff-resolution"),  # not tiled: read by tifffile, tags in inches
        ("appmag", 0.25, "objective-power"),  # Aperio with AppMag = 40 and nothing else
    ],
)
def test_mpp_chain_sources(metadata_files, kind, mpp, source):
    with Slide(metadata_files[kind]) as slide:
        assert slide.mpp == pytest.approx(mpp, rel=1e-6)
        assert slide.mpp_source == source


def test_given_mpp_overrides_the_metadata(metadata_files):
    with Slide(metadata_files["png"]) as slide:
        with pytest.raises(SlideError, match="--level0-mpp") as err:
            _ = slide.mpp
        assert str(metadata_files["png"]) in str(err.value)
    with Slide(metadata_files["png"], level0_mpp=0.3) as slide:
        assert (slide.mpp, slide.mpp_source) == (0.3, "override")
        assert slide.override_warning() is None  # no metadata to disagree with
    with Slide(metadata_files["generic"], level0_mpp=0.3) as slide:  # wrong metadata corrected
        assert (slide.mpp, slide.mpp_source) == (0.3, "override")
        assert (slide.metadata_resolution.mpp, slide.metadata_resolution.source) == (
            pytest.approx(0.25),
            "tiff-resolution",
        )
        np.testing.assert_array_equal(  # 100 px at 0.6 mpp are 200 level-0 px at 0.3 mpp
            slide.read_at_mpp((0, 0), 100, 0.6), slide.read_tile((0, 0), (200, 200), (100, 100))
        )
        warning = slide.override_warning()
        assert str(metadata_files["generic"]) in warning
        assert "0.3 overrides 0.25" in warning and "0.3 is used" in warning
    with Slide(metadata_files["generic"], level0_mpp=0.26) as slide:  # 4% apart: no warning
        assert slide.mpp == 0.26 and slide.override_warning() is None
    with pytest.raises(SlideError, match="outside 0.05-50") as err:
        Slide(metadata_files["generic"], level0_mpp=250.0)  # px per mm, not um per px
    assert str(metadata_files["generic"]) in str(err.value)


def test_aperio_description_without_openslide_mpp():
    props = {
        "tiff.ImageDescription": "Aperio Image Library v12 \r\n100x100 |AppMag = 20|MPP = 0.4990"
    }
    assert resolve_mpp(props).source == "aperio-mpp"
    props = {"tiff.ImageDescription": "Aperio Image Library v12 \r\n100x100 |AppMag = 40"}
    assert resolve_mpp(props).mpp == 0.25
    assert resolve_mpp({"tiff.XResolution": "1", "tiff.ResolutionUnit": "inch"}) is None  # junk


def test_reads_at_target_mpp_from_the_best_level(tiny_cohort):
    path = first_slide(tiny_cohort, site="C")  # 0.25 mpp, levels 1x and 4x
    with Slide(path) as slide:
        assert slide.mpp == 0.25 and slide.level_count >= 2
        assert slide.best_level(2.0) == 0  # 0.5 mpp: level 1 (4x) is too coarse
        assert slide.best_level(4.0) == 1
        assert slide.best_level(3.999) == 1  # non-integer pyramid downsample within 1%
        exact = slide.read_at_mpp((256, 512), 128, 1.0)  # 1.0 mpp = level 1 exactly
        np.testing.assert_array_equal(exact, slide.read_region((256, 512), 1, (128, 128)))
        half = slide.read_at_mpp((256, 512), 256, 0.5)  # level 0, 512 px resized
        by_hand = Image.fromarray(
            np.ascontiguousarray(slide.read_region((256, 512), 0, (512, 512)))
        )
        by_hand = np.asarray(by_hand.resize((256, 256), Image.Resampling.BILINEAR))
        assert half.shape == (256, 256, 3)
        assert np.abs(half.astype(int) - by_hand).mean() < 1.0  # PIL's antialiased bilinear


def test_resolutions_within_two_percent_are_read_one_to_one(tiny_cohort):
    path = first_slide(tiny_cohort, site="A")  # 0.502 mpp
    with Slide(path) as slide:
        tile = slide.read_at_mpp((300, 400), 256, 0.5)  # 255 level-0 px: read 256 as they are
        np.testing.assert_array_equal(tile, slide.read_region((300, 400), 0, (256, 256)))


def test_chunked_thumbnail_equals_a_single_read(tiny_cohort):
    with Slide(first_slide(tiny_cohort)) as slide:
        whole = slide.thumbnail_at_mpp(8.0, chunk=1 << 20)
        chunked = slide.thumbnail_at_mpp(8.0, chunk=64)
        ratio = slide.dimensions[0] / whole.shape[1]
    assert whole.shape == chunked.shape
    assert ratio * 0.5 == pytest.approx(8.0, rel=0.02)
    assert np.abs(whole.astype(int) - chunked).mean() < 2.0


@pytest.mark.parametrize(
    "name,message",
    [
        ("truncated.svs", "truncated or corrupt"),
        ("notes.svs", "not a slide format"),
        ("empty.tiff", "empty"),
    ],
)
def test_broken_files_give_clear_errors(broken_dir, name, message):
    with pytest.raises(SlideError, match=message) as err, Slide(broken_dir / name) as slide:
        slide.thumbnail_at_mpp(8.0)  # a truncated file may only fail when read
    assert str(broken_dir / name) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(SlideError, match="no such file"):
        Slide(tmp_path / "nope.svs")


def test_demo_records_agree_with_reader(tiny_cohort):
    for r in json.loads((tiny_cohort / "cohort.json").read_text())["slides"]:
        with Slide(tiny_cohort / r["path"]) as slide:
            assert slide.mpp == pytest.approx(r["mpp"], abs=1e-4)
            assert slide.dimensions == (r["width"], r["height"])


def test_outside_the_scanned_area_is_white_glass(tiny_cohort):
    with Slide(first_slide(tiny_cohort)) as slide:
        region = slide.read_region((-64, -64), 0, (128, 128))
        assert region.shape == (128, 128, 3) and region.flags["C_CONTIGUOUS"]
        assert (region[:64, :64] == 255).all()  # transparent -> white
        assert (region[64:, 64:] < 255).any()  # the slide itself


@pytest.fixture(scope="module")
def huge_plain_images(tmp_path_factory, metadata_files) -> dict[str, Path]:
    """Images too big to read whole, with few bytes: a stripped TIFF whose size tags say
    20000 x 20000 px (the pixels are missing: it is never decoded) and a blank 1-bit PNG."""
    folder = tmp_path_factory.mktemp("huge")
    tiff = folder / "huge.tif"
    shutil.copy(metadata_files["stripped"], tiff)
    with tifffile.TiffFile(tiff, mode="r+") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(20000)
        tif.pages[0].tags["ImageLength"].overwrite(20000)
    png = folder / "huge.png"
    Image.new("1", (20000, 20000), 1).save(png)
    return {"tiff": tiff, "png": png}


@pytest.mark.parametrize("kind", ["tiff", "png"])
def test_plain_images_too_big_to_read_whole_are_refused(huge_plain_images, kind):
    with pytest.raises(SlideError, match="pyramidal TIFF") as err:
        Slide(huge_plain_images[kind])
    assert str(huge_plain_images[kind]) in str(err.value) and "20000 x 20000" in str(err.value)


def test_plain_image_edges_are_white_like_openslide(metadata_files):
    with Slide(metadata_files["png"], level0_mpp=0.5) as slide:  # 1000 x 1000 px
        region = slide.read_region((900, -50), 0, (200, 200))
        assert (region[:50] == 255).all() and (region[:, 100:] == 255).all()
        assert (region[50:, :100] < 255).any()
        tile = slide.read_tile((800, 800), (400, 400), (100, 100))
        assert (tile[60:, 60:] == 255).all()


@pytest.mark.parametrize("name", ["cmu", "tcga", "prostate_tiff", "demo"])
def test_levels_decoded_by_tifffile_equal_openslide(name, cmu_svs, slide_files, tiny_cohort):
    """Whole levels of Aperio (JPEG and JPEG 2000 tiles) and generic tiled TIFF slides
    decoded by tifffile are OpenSlide's pixels exactly."""
    path = {
        "cmu": cmu_svs,
        "tcga": slide_files["tcga_svs"],
        "prostate_tiff": slide_files["prostate_tiff"],
        "demo": first_slide(tiny_cohort),
    }[name]
    with Slide(path, level0_mpp=0.5) as slide:
        for level in range(slide.level_count):
            assert slide._level_page(level) is not None, level
            w, h = slide.level_dimensions[level]
            want = slide.read_region((0, 0), level, (w, h))
            np.testing.assert_array_equal(slide.read_level(level), want)


def test_levels_of_other_formats_and_missing_tiles_are_read_by_openslide(slide_files, tmp_path):
    """A DICOM slide, and a TIFF with a missing tile (OpenSlide shows white glass there),
    are read through OpenSlide."""

    with Slide(slide_files["cmu_dicom"]) as slide:
        assert slide._level_page(0) is None
        w, h = slide.level_dimensions[-1]
        level = slide.level_count - 1
        np.testing.assert_array_equal(
            slide.read_level(level), slide.read_region((0, 0), level, (w, h))
        )
    image = np.full((512, 512, 3), 120, np.uint8)
    with tifffile.TiffWriter(tmp_path / "sparse.tif") as tif:
        tiles = (image[:256, :256] if i != 1 else None for i in range(4))  # tile 1 missing
        tif.write(tiles, shape=image.shape, dtype=np.uint8, tile=(256, 256), photometric="rgb")
    with Slide(tmp_path / "sparse.tif", level0_mpp=0.5) as slide:
        assert slide.vendor == "generic-tiff" and slide._level_page(0) is None
        level = slide.read_level(0)
    assert (level[:256, 256:] == 255).all() and (level[:256, :256] == 120).all()
