"""Deliberately broken and metadata-poor files, made from the real demo slides and textures."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline.wsi.writer import write_aperio_tiff


def first_slide(cohort: Path, site: str | None = None) -> Path:
    import json

    records = json.loads((cohort / "cohort.json").read_text())["slides"]
    record = next(r for r in records if site is None or r["site"] == site)
    return cohort / record["path"]


@pytest.fixture(scope="session")
def broken_dir(tmp_path_factory, tiny_cohort, sources) -> Path:
    """A folder of bad inputs: truncated, not a slide, empty, blank, no mpp."""
    folder = tmp_path_factory.mktemp("broken")
    data = first_slide(tiny_cohort).read_bytes()
    (folder / "truncated.svs").write_bytes(data[: len(data) // 3])
    (folder / "notes.svs").write_text("this is a text file, not a slide\n")
    (folder / "empty.tiff").write_bytes(b"")
    write_aperio_tiff(folder / "blank.svs", np.full((1200, 1600, 3), 243, np.uint8), 0.5, 20)
    shutil.copy(sources["carcinoma"], folder / "no_mpp.png")
    return folder


@pytest.fixture(scope="session")
def metadata_files(tmp_path_factory, sources) -> dict[str, Path]:
    """Real H&E written with each kind of resolution metadata."""
    folder = tmp_path_factory.mktemp("metadata")
    rgb = np.asarray(Image.open(sources["carcinoma"]).convert("RGB"))
    big = np.tile(rgb, (2, 2, 1))  # 2000 x 2000
    files = {}
    # generic tiled pyramidal TIFF with resolution tags only (OpenSlide: generic-tiff)
    path = folder / "generic.tiff"
    with tifffile.TiffWriter(path) as tif:
        res = {"resolution": (1e4 / 0.25, 1e4 / 0.25), "resolutionunit": "CENTIMETER"}
        tif.write(big, tile=(256, 256), photometric="rgb", compression="jpeg", metadata=None, **res)
        small = big[::4, ::4]
        tif.write(
            small,
            tile=(256, 256),
            photometric="rgb",
            compression="jpeg",
            metadata=None,
            subfiletype=1,
            resolution=(1e4, 1e4),
            resolutionunit="CENTIMETER",
        )
    files["generic"] = path
    # stripped (non-tiled) TIFF with resolution tags in inches: OpenSlide refuses it
    path = folder / "stripped.tif"
    tifffile.imwrite(
        path,
        rgb,
        photometric="rgb",
        metadata=None,
        resolution=(25400 / 0.5, 25400 / 0.5),
        resolutionunit="INCH",
    )
    files["stripped"] = path
    # Aperio with AppMag only, no MPP and no resolution tags
    path = folder / "appmag.svs"
    write_aperio_tiff(path, big, 0.25, 40)
    with tifffile.TiffFile(path, mode="r+") as tif:
        page = tif.pages[0]
        description = page.description.replace("|MPP = 0.2500", "")
        page.tags["ImageDescription"].overwrite(description)
        for name in ("XResolution", "YResolution", "ResolutionUnit"):
            page.tags[name].overwrite((1, 1) if name != "ResolutionUnit" else 1)
    files["appmag"] = path
    files["png"] = folder / "plain.png"
    Image.fromarray(rgb).save(files["png"])
    return files
