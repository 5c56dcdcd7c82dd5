import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.data.tiles import TileDataset
from pipeline.encoders import load_encoder
from pipeline.eval.robustness import sampled_silhouette
from pipeline.stain import load_normalizer
from pipeline.stain.cli import sample_tiles
from pipeline.stain.report import colour_features, encoder_features, slide_clustering
from pipeline.wsi.preprocess import PreprocessConfig, preprocess
from tests.tiny_encoder import save_tiny_encoder


@pytest.fixture(scope="module")
def coords_dir(tmp_path_factory, tiny_cohort):
    out = tmp_path_factory.mktemp("stain-prep")
    preprocess(
        PreprocessConfig(slides=str(tiny_cohort / "slides"), out=out, tile_size=128), progress=False
    )
    return out / "coords"


@pytest.fixture(scope="module")
def stain_json(tmp_path_factory, carcinoma):
    folder = tmp_path_factory.mktemp("stain")
    Image.fromarray(carcinoma[:, :512, :512].permute(1, 2, 0).numpy()).save(folder / "target.png")
    assert (
        main(
            [
                "stain",
                "--action",
                "fit",
                "--method",
                "macenko",
                "--target",
                str(folder / "target.png"),
                "--out",
                str(folder / "stain.json"),
            ]
        )
        == 0
    )
    return folder / "stain.json"


def test_cli_fit_and_apply_on_an_image_and_a_slide_region(
    stain_json, tiny_cohort, tmp_path, capsys
):
    assert json.loads(stain_json.read_text())["method"] == "macenko"
    slide = sorted((tiny_cohort / "slides").glob("*.svs"))[0]
    out = tmp_path / "region.png"
    assert (
        main(
            [
                "stain",
                "--action",
                "apply",
                "--stain",
                str(stain_json),
                "--input",
                str(slide),
                "--region",
                "256,256,300,200",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size == (300, 200)
    assert (
        main(
            [
                "stain",
                "--action",
                "apply",
                "--stain",
                str(stain_json),
                "--input",
                str(slide),
                "--region",
                "1,2",
                "--out",
                str(out),
            ]
        )
        == 1
    )
    assert "is not x,y,w,h" in capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["stain", "--action", "fit", "--out", str(tmp_path / "s.json")]) == 1
    assert "needs --target" in capsys.readouterr().err
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64, 3), 250, np.uint8)).save(blank)
    assert (
        main(
            ["stain", "--action", "fit", "--target", str(blank), "--out", str(tmp_path / "s.json")]
        )
        == 1
    )
    assert "too little tissue" in capsys.readouterr().err


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny exported ViT (64 px, 2 blocks, 48-d features)."""
    return save_tiny_encoder(tmp_path_factory.mktemp("enc") / "encoder")


def stain_report(stain_json, coords_dir, out, tiles: int, *extra: str) -> dict:
    """`cpath stain --action report` on ``tiles`` tiles per slide; its report."""
    argv = ["stain", "--action", "report", "--stain", str(stain_json), "--input"]
    argv += [str(coords_dir), "--out", str(out), "--tiles-per-slide", str(tiles), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_normalization_reduces_slide_clustering_of_the_demo_cohort(
    coords_dir, stain_json, tmp_path, capsys, caplog
):
    """The demo's sites differ in stain colour: tiles cluster by slide until normalized."""
    with caplog.at_level(logging.INFO):
        report = stain_report(stain_json, coords_dir, tmp_path / "r.json", 24)
    assert report["features"] == "colour statistics" and report["feature_dim"] == 12
    assert "measured on colour statistics" in capsys.readouterr().out + caplog.text
    before, after = report["before"], report["after"]
    assert before["slides"] == 6 and before["chance"] == pytest.approx(1 / 6)
    assert before["slide_probe_accuracy"] > 2 * before["chance"]
    assert after["slide_probe_accuracy"] < before["slide_probe_accuracy"] - 0.1
    assert after["silhouette"] < before["silhouette"]
    tiles, slides = sample_tiles(coords_dir, 24)  # the tiles the report measured
    assert before["silhouette"] == pytest.approx(sampled_silhouette(colour_features(tiles), slides))


def test_report_measures_the_features_of_a_given_encoder(
    coords_dir, stain_json, encoder_dir, tmp_path, capsys, caplog
):
    with caplog.at_level(logging.INFO):
        report = stain_report(
            stain_json, coords_dir, tmp_path / "r.json", 8, "--encoder", str(encoder_dir)
        )
    assert report["features"] == f"features of encoder {encoder_dir}"
    assert report["feature_dim"] == 48
    assert f"measured on features of encoder {encoder_dir}" in capsys.readouterr().out + caplog.text
    tiles, slides = sample_tiles(coords_dir, 8)  # the tiles the report measured
    encoder = load_encoder(encoder_dir)
    expected = slide_clustering(encoder_features(encoder, tiles), slides)
    assert report["before"] == pytest.approx(expected, rel=1e-6, abs=1e-6)
    normalized = encoder_features(encoder, load_normalizer(stain_json)(tiles))
    assert report["after"]["silhouette"] == pytest.approx(sampled_silhouette(normalized, slides))


def test_slide_clustering_on_planted_clusters():
    rng = np.random.default_rng(0)
    slides = np.repeat(np.arange(3), 30)
    separated = rng.normal(size=(90, 4)) + slides[:, None] * 5
    mixed = rng.normal(size=(90, 4))
    assert slide_clustering(separated, slides)["slide_probe_accuracy"] > 0.95
    assert slide_clustering(mixed, slides)["slide_probe_accuracy"] < 0.6
    with pytest.raises(ValueError, match="two slides"):
        slide_clustering(mixed, np.zeros(90))


def test_tile_dataset_applies_a_stain_file(coords_dir, stain_json):
    files = sorted(coords_dir.glob("*.h5"))[:2]
    plain, normalized = TileDataset(files), TileDataset(files, stain_norm=stain_json)
    expected = load_normalizer(stain_json)(plain[0]["image"])
    assert torch.equal(normalized[0]["image"], expected)
