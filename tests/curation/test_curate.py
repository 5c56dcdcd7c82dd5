"""``cpath curate`` end to end on feature files of the tiny cohort."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.curation.curate import CurateConfig, run
from pipeline.curation.store import read_weights
from pipeline.errors import ConfigError, PipelineError


@pytest.fixture(scope="module")
def curated(tmp_path_factory, planted_features, tiny_prep):
    """``cpath curate`` of the planted features (2 levels, 3 top clusters), the report's
    example tiles read through the coords files."""
    features, _ = planted_features
    out = tmp_path_factory.mktemp("curate")
    args = [
        "curate",
        "--features",
        str(features),
        "--coords",
        str(tiny_prep / "coords"),
        "--clusters",
        "[12,3]",
        "--n_init",
        "3",
        "--examples",
        "4",
        "--progress",
        "false",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    return out, args


def test_curate_writes_balanced_weights_a_table_and_a_report(curated, planted_features):
    out, _ = curated
    _, concepts = planted_features
    slides, attrs = read_weights(out / "weights.h5")
    assert set(slides) == set(concepts)
    assert attrs["encoder"] == "planted" and attrs["clusters"] == [12, 3]
    assert attrs["config"]["clusters"] == [12, 3] and attrs["n_slides"] == len(concepts)
    assert [sum(s) for s in attrs["cluster_sizes"]] == [attrs["n_tiles"]] * 2
    weight = np.concatenate([slides[s].weight for s in concepts])
    top = np.concatenate([slides[s].clusters[:, 1] for s in concepts])
    truth = np.concatenate([concepts[s] for s in concepts])
    np.testing.assert_allclose(weight.sum(), 1.0)
    share = np.bincount(truth, weights=weight, minlength=3)  # each planted concept's share
    np.testing.assert_allclose(share, [1 / 3] * 3, atol=0.02)  # its top cluster found
    assert len(np.unique(top)) == 3
    with open(out / "clusters.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    tops = [r for r in rows if r["level"] == "1"]
    assert len(tops) == 3 and all(r["parent"] == "-1" for r in tops)
    assert sorted(round(float(r["share_weighted"]), 4) for r in tops) == [0.3333] * 3
    assert max(float(r["share_tiles"]) for r in tops) > 0.7
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1 + 3  # shares plot + a strip per cluster
    assert not list(out.glob(".*.tmp"))


def test_a_rerun_skips_and_other_settings_redo(curated, capsys):
    out, args = curated
    stamp = (out / "weights.h5").stat().st_mtime_ns
    assert main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert (out / "weights.h5").stat().st_mtime_ns == stamp
    redo = out.parent / (out.name + "_redo")
    (redo).mkdir()
    for name in ("weights.h5", "clusters.csv", "report.html"):
        (redo / name).write_bytes((out / name).read_bytes())
    assert main([*args[:-1], str(redo), "--seed", "1", "--examples", "0"]) == 0
    with h5py.File(redo / "weights.h5", "r") as f:
        assert json.loads(f.attrs["config"])["seed"] == 1


def test_groups_set_each_group_share(planted_features, tmp_path):
    features, concepts = planted_features
    ids = sorted(concepts)
    groups = tmp_path / "groups.csv"
    groups.write_text(
        "slide_id,group\n" + "".join(f"{s},{'ab'[i % 2]}\n" for i, s in enumerate(ids))
    )
    cfg = CurateConfig(
        features=features,
        clusters=[3],
        groups=groups,
        group_weights={"a": 3.0, "b": 1.0},
        examples=0,
        progress=False,
        out=tmp_path / "out",
    )
    assert run(cfg) == 0
    slides, _ = read_weights(cfg.out / "weights.h5")
    mass = {
        g: sum(slides[s].weight.sum() for s in ids if slides[s].attrs["group"] == g) for g in "ab"
    }
    assert mass["a"] == pytest.approx(0.75) and mass["b"] == pytest.approx(0.25)
    groups.write_text("slide_id,group\n" + f"{ids[0]},a\n")
    with pytest.raises(ConfigError, match="no group for"):
        run(CurateConfig(features=features, clusters=[3], groups=groups, out=tmp_path / "o2"))


def test_clear_errors(planted_features, tmp_path):
    features, _ = planted_features
    with pytest.raises(ConfigError, match="needs tile features"):
        run(CurateConfig(out=tmp_path))
    with pytest.raises(ConfigError, match="must decrease"):
        run(CurateConfig(features=features, clusters=[3, 8], out=tmp_path))
    with pytest.raises(ConfigError, match="lower the counts"):
        run(CurateConfig(features=features, clusters=[10**6], out=tmp_path, progress=False))
    with pytest.raises(PipelineError, match="no .h5 feature files"):
        run(CurateConfig(features=tmp_path, out=tmp_path / "o"))
    with pytest.raises(ConfigError, match="--encoder needs --coords"):
        run(CurateConfig(encoder="timm:vit_tiny_patch16_224", out=tmp_path))


def test_with_an_encoder_curate_extracts_the_features_first(tiny_prep, tmp_path, capsys):
    from tests.tiny_encoder import save_tiny_encoder

    encoder = save_tiny_encoder(tmp_path / "encoder")
    cfg = CurateConfig(
        coords=tiny_prep / "coords",
        encoder=str(encoder),
        batch_size=64,
        workers=0,
        device="cpu",
        clusters=[6, 2],
        examples=2,
        report_clusters=1,
        progress=False,
        out=tmp_path / "out",
    )
    assert run(cfg) == 0
    files = sorted((cfg.out / "features").glob("*.h5"))
    assert len(files) == len(list((tiny_prep / "coords").glob("*.h5")))
    slides, attrs = read_weights(cfg.out / "weights.h5")
    assert attrs["encoder_sha256"] and attrs["embed_dim"] == 48
    assert set(slides) == {f.stem for f in files}
    assert (cfg.out / "report.html").read_text().count("base64,") == 2
    capsys.readouterr()
    assert run(cfg) == 0  # extraction and curation both skip
    assert "up to date" in capsys.readouterr().out
