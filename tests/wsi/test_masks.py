"""User tissue masks and labelled annotations on the real CMU slide and a demo slide: the
tiles follow the given shapes (shares checked by point sampling of the polygons here), the
labels land in the coords file, per-label caps hold, reruns notice changed files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.measure import points_in_poly

from pipeline.wsi.coords import read_coords
from pipeline.wsi.preprocess import PreprocessConfig, preprocess

SIZE0 = round(256 * 0.5 / 0.499)  # level-0 px of a 256-px tile at 0.5 mpp on the CMU slide
# CMU: 2220 x 2967 px. A tissue outline with a hole, and two classified regions.
OUTER = [[300, 400], [1900, 400], [1900, 2600], [300, 2600], [300, 400]]
HOLE = [[800, 1200], [1400, 1200], [1400, 1800], [800, 1800], [800, 1200]]
TUMOUR = [[0, 0], [1300, 0], [1300, 1300], [0, 1300], [0, 0]]
STROMA = [[1000, 1500], [2220, 1500], [2220, 2967], [1000, 2967], [1000, 1500]]


def _feature(rings, name=None):
    properties = {"objectType": "annotation"}
    if name:
        properties["classification"] = {"name": name, "color": [200, 0, 0]}
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": rings},
        "properties": properties,
    }


def _share(rings, x: int, y: int, n: int = 16) -> float:
    """Share of a tile inside a polygon with holes, by sampling n x n points."""
    offsets = (np.arange(n) + 0.5) * SIZE0 / n
    points = np.stack(np.meshgrid(x + offsets, y + offsets), -1).reshape(-1, 2)
    inside = points_in_poly(points, np.asarray(rings[0], float))
    for hole in rings[1:]:
        inside &= ~points_in_poly(points, np.asarray(hole, float))
    return float(inside.mean())


def _grid(width: int, height: int) -> list[tuple[int, int]]:
    step = 256 * 0.5 / 0.499
    xs = [round(i * step) for i in range(int((width - SIZE0) / step) + 1)]
    ys = [round(i * step) for i in range(int((height - SIZE0) / step) + 1)]
    return [(x, y) for y in ys for x in xs]


def _run(cmu_svs: Path, out: Path, **kwargs) -> dict:
    cfg = PreprocessConfig(slides=str(cmu_svs), out=out, tile_size=256, **kwargs)
    rows = preprocess(cfg, progress=False)
    return rows[0]


@pytest.fixture()
def cmu(tmp_path, cmu_svs) -> Path:
    """The CMU slide linked under the id ``cmu``."""
    slide = tmp_path / "cmu.svs"
    slide.symlink_to(cmu_svs)
    return slide


def test_geojson_tissue_mask_replaces_detection(tmp_path, cmu):
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "cmu.geojson").write_text(  # a QuPath export: a list of features
        json.dumps([_feature([OUTER, HOLE])])
    )
    row = _run(cmu, tmp_path / "out", tissue_mask=str(masks))
    assert row["status"] == "ok", row["error"]
    table = read_coords(tmp_path / "out" / "coords" / "cmu.h5")
    kept = {tuple(c) for c in table.coords.tolist()}
    for x, y in _grid(2220, 2967):
        share = _share([OUTER, HOLE], x, y)
        if share >= 0.55:
            assert (x, y) in kept, (x, y, share)
        elif share < 0.45:
            assert (x, y) not in kept, (x, y, share)
    shares = np.array([_share([OUTER, HOLE], x, y) for x, y in table.coords.tolist()])
    assert np.abs(shares - table.tissue_fraction).max() < 0.05
    assert len(kept) > 20  # glass inside the outline is tissue now: the mask rules
    rerun = _run(cmu, tmp_path / "out", tissue_mask=str(masks))
    assert rerun["status"] == "skipped"
    (masks / "cmu.geojson").write_text(json.dumps(_feature([OUTER])))  # the hole filled in
    again = _run(cmu, tmp_path / "out", tissue_mask=str(masks))
    assert again["status"] == "ok" and again["n_tiles"] > row["n_tiles"]


def test_mask_image_on_a_demo_slide(tmp_path, tiny_cohort):
    """The demo's ground-truth tissue mask given as the mask image: every tile lies on it."""
    record = json.loads((tiny_cohort / "cohort.json").read_text())["slides"][0]
    sid, ds = record["slide_id"], record["mask_downsample"]
    masks = tmp_path / "masks"
    masks.mkdir()
    truth = tiny_cohort / "ground_truth" / f"{sid}_tissue.png"
    (masks / f"{sid}.png").write_bytes(truth.read_bytes())
    cfg = PreprocessConfig(
        slides=str(tiny_cohort / record["path"]),
        out=tmp_path / "out",
        tile_size=128,
        tissue_mask=str(masks),
    )
    row = preprocess(cfg, progress=False)[0]
    assert row["status"] == "ok", row["error"]
    table = read_coords(tmp_path / "out" / "coords" / f"{sid}.h5")
    gt = np.asarray(Image.open(truth)) > 0
    size = table.patch_size_level0 / ds
    for x, y in table.coords / ds:
        box = gt[int(y) : int(np.ceil(y + size)), int(x) : int(np.ceil(x + size))]
        assert box.mean() > 0.4, (x, y, box.mean())


def test_missing_or_misshapen_masks_fail_their_slide_with_a_message(tmp_path, cmu):
    masks = tmp_path / "masks"
    masks.mkdir()
    row = _run(cmu, tmp_path / "a", tissue_mask=str(masks))
    assert row["status"] == "failed" and "no tissue mask for slide cmu" in row["error"]
    Image.fromarray(np.ones((100, 400), np.uint8) * 255).save(masks / "cmu.png")
    row = _run(cmu, tmp_path / "b", tissue_mask=str(masks))
    assert row["status"] == "failed" and "must span the whole slide" in row["error"]
    (masks / "cmu.png").unlink()
    (masks / "cmu.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    row = _run(cmu, tmp_path / "c", tissue_mask=str(masks))
    assert row["status"] == "failed" and "no Polygon" in row["error"]


@pytest.fixture()
def annotations(tmp_path) -> Path:
    folder = tmp_path / "annotations"
    folder.mkdir()
    collection = {
        "type": "FeatureCollection",
        "features": [_feature([TUMOUR], "Tumor"), _feature([STROMA], "Stroma")],
    }
    (folder / "cmu.geojson").write_text(json.dumps(collection))
    return folder


def test_annotation_labels_land_in_the_coords_file(tmp_path, cmu, annotations):
    row = _run(cmu, tmp_path / "out", annotations=str(annotations))
    assert row["status"] == "ok", row["error"]
    table = read_coords(tmp_path / "out" / "coords" / "cmu.h5")
    assert table.labels is not None and len(table.labels) == len(table.coords)
    for (x, y), label in zip(table.coords.tolist(), table.labels, strict=True):
        tumour, stroma = _share([TUMOUR], x, y), _share([STROMA], x, y)
        if max(tumour, stroma) < 0.45:
            assert label == "", (x, y, label)
        elif tumour >= 0.55 and tumour > stroma:
            assert label == "Tumor", (x, y, label)
        elif stroma >= 0.55 and stroma > tumour:
            assert label == "Stroma", (x, y, label)
    counts = json.loads(table.attrs["label_counts"])
    assert counts["Tumor"] > 2 and counts["Stroma"] > 2 and counts[""] > 0
    assert sum(counts.values()) == len(table.coords)


def test_annotated_only_and_per_label_caps(tmp_path, cmu, annotations):
    full = _run(cmu, tmp_path / "full", annotations=str(annotations), annotated_only=True)
    labels = read_coords(tmp_path / "full" / "coords" / "cmu.h5").labels
    assert "" not in set(labels) and full["n_tiles"] == len(labels)
    capped = []
    for run in ("a", "b"):
        _run(
            cmu,
            tmp_path / run,
            annotations=str(annotations),
            annotated_only=True,
            label_caps={"Tumor": 2},
        )
        capped.append(read_coords(tmp_path / run / "coords" / "cmu.h5"))
    a, b = capped
    assert (a.labels == "Tumor").sum() == 2  # capped
    assert (a.labels == "Stroma").sum() == (labels == "Stroma").sum()  # not named: all kept
    assert np.array_equal(a.coords, b.coords)  # the same seeded sample


def test_a_slide_without_annotations_fails(tmp_path, cmu):
    empty = tmp_path / "none"
    empty.mkdir()
    row = _run(cmu, tmp_path / "out", annotations=str(empty))
    assert row["status"] == "failed" and "no annotations for slide cmu" in row["error"]
