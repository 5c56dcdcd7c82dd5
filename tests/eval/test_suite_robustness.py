"""`cpath evaluate` on a small image-folder tile task with slides, patients and sites: folds
by patient, the site probe and the PathoROB robustness index in results, leaderboard and
report."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.eval.evaluate import EvaluateConfig, run
from pipeline.eval.report import leaderboard
from tests.tiny_encoder import save_tiny_encoder

SITE_TINT = {"A": (40, 0, 0), "B": (0, 40, 0), "C": (0, 0, 40), "D": (30, 30, 0)}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """8 patients x 2 slides x 6 tiles (3 tumour, 3 normal) at 4 sites, a tiny encoder."""
    root = tmp_path_factory.mktemp("suite")
    rng = np.random.default_rng(0)
    rows = ["slide_id,case_id,site"]
    for p in range(8):
        site = "ABCD"[p % 4]
        for s in range(2):
            slide = f"P{p}S{s}"
            rows.append(f"{slide},case{p},{site}")
            for t in range(6):
                label = "tumor" if t < 3 else "normal"
                base = np.array([150, 60, 140]) if label == "tumor" else np.array([230, 170, 210])
                pixels = base + SITE_TINT[site] + rng.normal(0, 25, (32, 32, 3))
                if label == "tumor":  # dark nuclei
                    pixels[rng.random((32, 32)) < 0.3] = (60, 20, 90)
                (root / "tiles" / label).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                    root / "tiles" / label / f"{slide}_{t}.png"
                )
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    # other weights than random:<folder> (seed 0)
    encoder = save_tiny_encoder(root / "encoder", seed=1)
    task = {
        "name": "tiles",
        "kind": "tile",
        "data": str(root / "tiles"),
        "group_pattern": r"^(P\d+S\d)_",
        "sites": str(root / "labels.csv"),
        "protocols": ["linear", "knn"],
        "folds": 4,
    }
    cfg = EvaluateConfig(
        encoder_specs={"tiny": str(encoder), "random": f"random:{encoder}"},
        tasks=[task],
        out=root / "eval",
        bootstrap=20,
        progress=False,
        robustness_k=5,
    )
    assert run(cfg) == 0
    return root / "eval"


def test_tile_folds_keep_patients_whole(suite):
    with open(suite / "tasks" / "tiles" / "folds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 96 and {r["case_id"] for r in rows} == {f"case{p}" for p in range(8)}
    for case in {r["case_id"] for r in rows}:
        assert len({r["test_fold"] for r in rows if r["case_id"] == case}) == 1
    result = json.loads((suite / "results.json").read_text())["tasks"]["tiles"]
    assert result["grouped_by"] == "patient" and result["n_groups"] == 8


def test_results_leaderboard_and_report_carry_the_robustness_index(suite):
    result = json.loads((suite / "results.json").read_text())["tasks"]["tiles"]
    for e in ("tiny", "random"):
        rob = result["robustness"][e]
        assert rob["leakage"]["target"] == "site" and rob["leakage"]["chance"] == 0.25
        assert rob["leakage"]["grouped_by"] == "patient" and rob["leakage"]["groups"] == 8
        assert rob["leakage"]["sites"] == 4
        ri = rob["robustness_index"]
        assert ri["confounder"] == "site" and ri["k"] == 5
        assert ri["ss"] + ri["so"] + ri["os"] + ri["oo"] == 96 * 5
        assert ri["value"] == pytest.approx(ri["so"] / (ri["so"] + ri["os"]))
        knn = rob["slide_knn"]  # WSI collapse: the slide of a tile from its neighbours
        assert 0.0 <= knn["accuracy"] <= 1.0 and knn["k"] == 10
        assert knn["chance"] == pytest.approx(1 / knn["slides"], rel=0.5)
    with open(suite / "leaderboard.csv", newline="") as f:
        board = {r["encoder"]: r for r in csv.DictReader(f)}
    for e in ("tiny", "random"):
        value = result["robustness"][e]["robustness_index"]["value"]
        assert float(board[e]["tiles/robustness_index"]) == pytest.approx(value)
    assert (board["tiny"]["weights"], board["random"]["weights"]) == ("pretrained", "random")
    report = (suite / "report.md").read_text()
    assert "PathoROB robustness index" in report and "held-out slides" in report
    assert "slide-ID kNN (WSI collapse)" in report
    assert "| random (random init) |" in report and "| tiny |" in report
    assert "PathoROB robustness index" in (suite / "report.html").read_text()


def test_the_robustness_index_is_shown_but_not_ranked():
    score = {"a": {"value": 0.9}, "b": {"value": 0.7}}
    results = {
        "encoders": {"a": "x", "b": "y"},
        "tasks": {
            "t": {
                "status": "ok",
                "columns": {"linear": {}},
                "scores": {"linear": score},
                "robustness": {
                    "a": {"robustness_index": {"value": 0.2}},
                    "b": {"robustness_index": {"value": 0.8}},
                },
            }
        },
    }
    columns, rows = leaderboard(results)
    assert columns == ["t/linear", "t/robustness_index"]
    assert [(r["encoder"], r["mean_rank"], r["t/robustness_index"]) for r in rows] == [
        ("a", 1.0, 0.2),
        ("b", 2.0, 0.8),
    ]
