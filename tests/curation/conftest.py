"""Feature files of the tiny demo cohort's tiles with planted clusters (no encoder run)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.extraction import feature_coords_attrs
from pipeline.features import FeatureWriter
from pipeline.wsi.coords import list_coords_files, read_coords

PLANTED = (0.80, 0.15, 0.05)  # share of the tiles of each planted concept


def write_planted_features(coords: Path, out: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """One feature file per coords file of ``coords`` in ``out``: 8-dim features of 3
    well-separated concepts holding 80/15/5 % of the tiles. Returns each slide's concepts."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (len(PLANTED), 8)) * 8
    concepts = {}
    for path in list_coords_files(coords):
        table = read_coords(path)
        sid = str(table.attrs.get("slide_id") or path.stem)
        n = len(table)
        concept = rng.choice(len(PLANTED), n, p=PLANTED)  # n
        feats = centres[concept] + rng.normal(0, 1, (n, 8))  # n x 8
        attrs = {
            "slide_id": sid,
            "slide_path": table.slide_path,
            "encoder": "planted",
            "encoder_sha256": "0" * 64,
        }
        writer = FeatureWriter(
            out / f"{sid}.h5",
            n,
            8,
            table.coords,
            attrs,
            "float32",
            coords_attrs=feature_coords_attrs(table),
        )
        writer.write(feats, 0)
        writer.close()
        concepts[sid] = concept
    return concepts


@pytest.fixture(scope="module")
def planted_features(tmp_path_factory, tiny_prep) -> tuple[Path, dict[str, np.ndarray]]:
    """``(features folder, {slide_id: planted concept per tile})`` of the tiny cohort."""
    out = tmp_path_factory.mktemp("planted_features")
    return out, write_planted_features(tiny_prep / "coords", out)
