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
    rows = [
        f"{i.relative_to(folder).as_posix() if i.parent.name == 'tumor' else i.name},"
        f"{i.name.split('_')[0]}"
        for i in sorted(folder.rglob("*.png"))
    ]
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


def _tiles_csv(path, with_case: bool = True):
    """Tiles of 8 patients with two slides each (16 slides, 6 tiles per slide, both classes)."""
    rows = ["coords,index,label,slide_id" + (",case_id" if with_case else "")]
    for p in range(8):
        for s in range(2):
            for t in range(6):
                case = f",P{p}" if with_case else ""
                rows.append(f"S{p}_{s}.h5,{t},{'tumor' if t % 2 else 'normal'},S{p}_{s}{case}")
    path.write_text("\n".join(rows) + "\n")
    return path


def _patient_of(slide: str) -> str:
    return "P" + slide[1:].split("_")[0]


def _sides(tiles, folds):
    """Per fold: the patients whose slides fall on both sides of the split."""
    return [
        {_patient_of(s) for s in tiles.groups[train]} & {_patient_of(s) for s in tiles.groups[test]}
        for train, test in folds
    ]


def test_tile_folds_keep_both_slides_of_a_patient_on_one_side(tmp_path):
    tiles = read_tile_set(_tiles_csv(tmp_path / "tiles.csv"))
    by, groups = tiles.fold_groups()
    assert by == "patient" and sorted(np.unique(groups)) == [f"P{p}" for p in range(8)]
    folds = Folds.make(tiles.labels, groups, folds=4, what=by)
    assert _sides(tiles, folds) == [set()] * 4
    assert all(_sides(tiles, Folds.make(tiles.labels, tiles.groups, folds=4)))  # by slide: split
    # the slide labels file names patients where the tile table does not
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "slide_id,case_id,site\n"
        + "".join(f"S{p}_{s},P{p},{'AB'[p % 2]}\n" for p in range(8) for s in range(2))
    )
    from_labels = read_tile_set(_tiles_csv(tmp_path / "plain.csv", with_case=False), sites=labels)
    np.testing.assert_array_equal(from_labels.fold_groups()[1], groups)
    assert set(from_labels.sites) == {"A", "B"}
    assert (
        _sides(from_labels, Folds.make(from_labels.labels, from_labels.fold_groups()[1], folds=4))
        == [set()] * 4
    )
    # without patients, the folds fall back to slides
    plain = read_tile_set(tmp_path / "plain.csv")
    assert plain.fold_groups()[0] == "slide" and len(np.unique(plain.fold_groups()[1])) == 16


def test_a_slide_with_two_patients_is_refused(tmp_path):
    path = _tiles_csv(tmp_path / "tiles.csv")
    path.write_text(path.read_text().replace("S0_0,P0\n", "S0_0,P7\n", 1))
    with pytest.raises(PipelineError, match="slide S0_0 has two case_id values"):
        read_tile_set(path)
