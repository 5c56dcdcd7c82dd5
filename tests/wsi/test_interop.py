"""Our coords and feature files read by CLAM's and TRIDENT's readers give our pixels.

The readers below are written to what CLAM's ``Whole_Slide_Bag_FP`` and TRIDENT's
``read_coords`` + ``OpenSlideWSIPatcher`` do with a coords file: they use only the
``coords`` dataset and its attributes, and OpenSlide.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
from PIL import Image

from pipeline.data.tiles import TileDataset
from pipeline.wsi.preprocess import PreprocessConfig, run
from pipeline.wsi.writer import write_aperio_tiff


def clam_tiles(coords_file: Path, slide_path: Path) -> list[np.ndarray]:
    """CLAM: ``patch_size`` px read at ``patch_level`` from each level-0 (x, y)."""
    with h5py.File(coords_file, "r") as f:
        data = f["coords"]
        level, size = int(data.attrs["patch_level"]), int(data.attrs["patch_size"])
        coords = data[:]
    wsi = openslide.OpenSlide(slide_path)
    return [
        np.asarray(wsi.read_region((int(x), int(y)), level, (size, size)).convert("RGB"))
        for x, y in coords
    ]


def trident_tiles(coords_file: Path, slide_path: Path) -> list[np.ndarray]:
    """TRIDENT: um/px are ``10 / magnification``; read ``patch_size * downsample`` level-0 px
    at the best level (a level within 0.1 of the downsample, else the finer one), resize."""
    with h5py.File(coords_file, "r") as f:
        attrs, coords = dict(f["coords"].attrs), f["coords"][:]
    size = int(attrs["patch_size"])
    downsample = (10 / attrs["target_magnification"]) / (10 / attrs["level0_magnification"])
    size_src = round(size * downsample)
    wsi = openslide.OpenSlide(slide_path)
    levels = list(wsi.level_downsamples)
    exact = [i for i, d in enumerate(levels) if abs(d - downsample) <= 0.1]
    level = exact[0] if exact else max(i for i, d in enumerate(levels) if d <= downsample)
    size_level = round(size_src / int(levels[level]))
    out = []
    for x, y in coords:
        region = wsi.read_region((int(x), int(y)), level, (size_level, size_level)).convert("RGB")
        out.append(np.asarray(region.resize((size, size))))
    return out


def ours(coords_file: Path) -> list[np.ndarray]:
    dataset = TileDataset([coords_file])
    return [dataset.read(i).transpose(1, 2, 0) for i in range(len(dataset))]


@pytest.fixture(scope="module")
def slide_40x(tmp_path_factory, sources) -> Path:
    """Real H&E as a 0.25-mpp slide with one 4x level (1 mpp)."""
    rgb = np.asarray(Image.open(sources["carcinoma"]).convert("RGB"))
    folder = tmp_path_factory.mktemp("interop_slides")
    return write_aperio_tiff(folder / "h40x.svs", np.tile(rgb, (2, 2, 1)), 0.25, 40)


def preprocess(slide: Path, out: Path, mpp: float, tile: int) -> Path:
    assert (
        run(
            PreprocessConfig(
                slides=str(slide),
                out=out,
                mpp=mpp,
                tile_size=tile,
                thumbnails=False,
                min_tissue=0.1,
            )
        )
        == 0
    )
    (coords_file,) = (out / "coords").glob("*.h5")
    return coords_file


@pytest.mark.parametrize("mpp", [1.0, 0.25])
def test_clam_and_trident_readers_get_our_pixels_at_a_pyramid_level(slide_40x, tmp_path, mpp):
    coords_file = preprocess(slide_40x, tmp_path, mpp, 96)
    with h5py.File(coords_file, "r") as f:
        attrs = dict(f["coords"].attrs)
    assert attrs["clam_exact"] and attrs["patch_level"] == (1 if mpp == 1.0 else 0)
    assert attrs["target_magnification"] == pytest.approx(10 / mpp)
    assert attrs["level0_magnification"] == pytest.approx(40.0)
    expected = ours(coords_file)
    assert len(expected) > 3
    for reader in (clam_tiles, trident_tiles):
        got = reader(coords_file, slide_40x)
        assert len(got) == len(expected)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True)), reader


def test_trident_reader_gets_our_field_of_view_between_levels(slide_40x, tmp_path):
    """0.5 mpp on a 0.25-mpp slide with a 1-mpp level: read 2x at level 0 and resized.
    TRIDENT's reader gets our field of view (resampling differs: Pillow's bicubic against
    our antialiased bilinear); CLAM's would read a quarter of it, and the file says so."""
    coords_file = preprocess(slide_40x, tmp_path, 0.5, 96)
    with h5py.File(coords_file, "r") as f:
        attrs = dict(f["coords"].attrs)
    assert not attrs["clam_exact"] and attrs["patch_size_level0"] == 192
    expected = ours(coords_file)
    got = trident_tiles(coords_file, slide_40x)
    diff = [
        np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(got, expected, strict=True)
    ]
    shifted = np.abs(np.roll(expected[0], 8, axis=1).astype(int) - expected[0].astype(int)).mean()
    assert max(diff) < 3.0 < shifted, (max(diff), shifted)


def test_real_svs_read_alike_by_all_three(cmu_svs, tmp_path):
    """The real 0.499-mpp CMU slide at 0.5 mpp: level 0 read 1:1 by every reader."""
    coords_file = preprocess(cmu_svs, tmp_path, 0.5, 128)
    expected = ours(coords_file)
    assert len(expected) > 3
    for reader in (clam_tiles, trident_tiles):
        got = reader(coords_file, cmu_svs)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True)), reader
