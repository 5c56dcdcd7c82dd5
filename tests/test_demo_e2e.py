"""End to end: `cpath demo` on the 6-slide tiny cohort, every stage's outputs checked."""

import csv
import json
import shutil
import subprocess

import h5py
import pytest
from PIL import Image

from pipeline.demo import DemoConfig, run
from pipeline.errors import PipelineError

pytestmark = pytest.mark.slow


def images_of(page) -> list[str]:
    return [s.split("'")[0] for s in page.read_text().split("<img src='")[1:]]


def assert_renders(page) -> None:
    """Every figure of an HTML page exists and is a PNG (a JPEG for the QC thumbnails); in
    headless Chromium, when this machine has it, every figure also loads."""
    sources = images_of(page)
    assert sources
    for src in sources:
        with Image.open(page.parent / src) as im:
            expected = "JPEG" if "/thumbnails/" in src else "PNG"
            assert im.format == expected and min(im.size) > 16, src
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        dom = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--virtual-time-budget=5000",
                "--dump-dom",
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert f'data-images-loaded="{len(sources)}/{len(sources)}"' in dom


def test_every_stage_leaves_well_formed_outputs(tiny_demo):
    runs = tiny_demo.runs
    coords = sorted((runs / "preprocess" / "coords").glob("*.h5"))
    assert len(coords) == 10 and len(list((runs / "preprocess" / "thumbnails").glob("*.jpg"))) == 10
    listed = (runs / "preprocess" / "development.txt").read_text().split()
    assert listed == [f"coords/{c.name}" for c in coords if c.stem.startswith("demo_")]
    assert len(listed) == 6  # pretraining and the stain reference see these only
    assert json.loads((runs / "stain" / "stain.json").read_text())["method"] == "macenko"
    report = json.loads((runs / "stain" / "report.json").read_text())
    assert report["after"]["slide_probe_accuracy"] <= report["before"]["slide_probe_accuracy"]
    for name in ("pretrained", "random"):
        files = sorted((runs / "features" / name).glob("*.h5"))
        assert [f.stem for f in files] == [c.stem for c in coords]
        with h5py.File(files[0]) as f:
            assert f["features"].shape[1] == 192 and f.attrs["complete"]
    for name in ("pretrained", "random"):
        metrics = json.loads((runs / "mil" / name / "metrics.json").read_text())
        assert len(metrics["folds"]) == 3 and 0 <= metrics["pooled"]["auc"]["value"] <= 1
        with open(runs / "mil" / name / "predictions.csv") as f:
            assert len(list(csv.DictReader(f))) == 6  # the development cohort
    survival = json.loads((runs / "mil" / "survival" / "metrics.json").read_text())
    assert "c_index" in survival["pooled"]
    results = json.loads((runs / "eval" / "results.json").read_text())
    assert {t["status"] for t in results["tasks"].values()} == {"ok"}
    heatmaps = [p for p in (runs / "heatmaps").glob("*.png") if not p.stem.endswith("_top")]
    assert len(heatmaps) == 3  # the tumour slides of the tiny cohort
    assert_renders(runs / "report.html")
    assert_renders(runs / "eval" / "report.html")
    page = (runs / "report.html").read_text()
    for section in (
        "Tissue detection",
        "Stain normalization",
        "pretraining",
        "Attention heatmaps",
        "Encoder evaluation",
        "ground truth",
    ):
        assert section in page


def test_rerun_reuses_every_finished_stage(tiny_demo, capsys):
    runs = tiny_demo.runs
    watched = [
        *sorted((runs / "features" / "pretrained").glob("*.h5")),
        runs / "mil" / "pretrained" / "fold_0" / "model.ckpt",
        runs / "eval" / "cache" / "pretrained" / "tissue-tiles-heldout.npz",
        runs / "eval" / "tasks" / "tissue-tiles" / "result.json",  # scores not recomputed
        runs / "eval" / "tasks" / "tumour-slides-heldout" / "result.json",
        runs / "eval" / "tasks" / "survival" / "result.json",
        runs / "stain" / "report.json",
        runs / "eval" / "tasks" / "tumour-slides" / "random" / "seed_0" / "fold_0" / "model.ckpt",
    ]
    before = [p.stat().st_mtime_ns for p in watched]
    run(tiny_demo)
    assert [p.stat().st_mtime_ns for p in watched] == before
    assert "report.html" in capsys.readouterr().out


def test_a_failing_stage_stops_the_demo_with_its_name(tiny_demo, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_demo.runs / "pretrain", runs / "pretrain")
    (runs / "pretrain" / "encoder" / "config.json").write_text("{broken")
    cfg = DemoConfig(**{**tiny_demo.__dict__, "runs": runs})
    with pytest.raises(PipelineError, match="demo stopped at stage 'extract'.*make demo"):
        run(cfg)
