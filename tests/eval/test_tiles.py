"""Image-folder tile sets grouped by slide or patient, so folds keep a slide on one side."""

import logging

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ConfigError, PipelineError
from pipeline.eval.protocols import Folds
from pipeline.eval.tiles import read_tile_set


@pytest.fixture
def folder(tmp_path):
    """Two classes, each with 3 tiles of 4 patients (file names P<patient>_<tile>.png)."""
    root = tmp_path / "tiles"
    for c, patients in (("tumor", (1, 2, 3, 4)), ("normal", (5, 6, 7, 8))):
        (root / c).mkdir(parents=True)
        for p in patients:
            for t in range(3):
                Image.new("RGB", (4, 4)).save(root / c / f"P{p}_{t}.png")
    return root


def test_images_grouped_by_pattern_or_csv_keep_patients_on_one_side(folder, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        by_image = read_tile_set(folder)
    assert len(np.unique(by_image.groups)) == 24 and "not grouped by slide" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tiles = read_tile_set(folder, group_pattern=r"^(P\d+)_")
    assert not caplog.text
    assert sorted(np.unique(tiles.groups)) == [f"P{p}" for p in range(1, 9)]
    for train, test in Folds.make(tiles.labels, tiles.groups, folds=4):
        assert not set(tiles.groups[train]) & set(tiles.groups[test])
    table = tmp_path / "groups.csv"  # by file name, and by path under the folder
    rows = [f"{i.relative_to(folder).as_posix() if i.parent.name == 'tumor' else i.name},"
            f"{i.name.split('_')[0]}" for i in sorted(folder.rglob("*.png"))]  # fmt: skip
    table.write_text("image,group\n" + "\n".join(rows) + "\n")
    np.testing.assert_array_equal(read_tile_set(folder, groups=table).groups, tiles.groups)


def test_bad_group_options_are_named(folder, tmp_path):
    with pytest.raises(PipelineError, match="does not match 24 file names"):
        read_tile_set(folder, group_pattern=r"^slide")
    (tmp_path / "few.csv").write_text("image,group\nP1_0.png,P1\n")
    with pytest.raises(PipelineError, match="no group for 23 images"):
        read_tile_set(folder, groups=tmp_path / "few.csv")
    with pytest.raises(ConfigError, match="not both"):
        read_tile_set(folder, groups=tmp_path / "few.csv", group_pattern="P")
