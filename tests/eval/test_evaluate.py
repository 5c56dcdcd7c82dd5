"""`cpath evaluate` as the demo runs it on the tiny cohort (the 200-step pretrained encoder
against its random init), then broken tasks beside working ones."""

import csv
import json
import shutil
from pathlib import Path

import h5py
import pytest
import yaml

from pipeline.cli import main
from pipeline.eval.evaluate import EvaluateConfig, run

MIL = {"epochs": 4, "lr": 2.0e-3, "patience": 4, "model_args": {"hidden": 16, "attn_dim": 8}}


@pytest.fixture(scope="module")
def results(tiny_demo):
    return json.loads((tiny_demo.runs / "eval" / "results.json").read_text())


def test_tile_protocols_carry_intervals_comparisons_fewshot_and_robustness(results):
    tiles = results["tasks"]["tissue-tiles"]  # cross-validated on the development cohort
    assert tiles["status"] == "ok" and tiles["n_slides"] == 6
    assert tiles["grouped_by"] == "patient" and tiles["n_groups"] == 5  # one with two slides
    for col in ("linear", "knn"):
        for e in ("pretrained", "random"):
            entry = tiles["scores"][col][e]
            assert entry["ci"][0] <= entry["value"] <= entry["ci"][1]
            assert set(entry["metrics"]) == {"auc", "balanced_accuracy", "f1"}
        (cmp,) = tiles["comparisons"][col]
        assert (cmp["a"], cmp["b"]) == ("pretrained", "random") and 0 <= cmp["p_value"] <= 1
    # each tissue class of the tiny cohort comes from one or two patients: few shots
    assert set(tiles["fewshot"]["pretrained"]) >= {"1", "2", "4"}
    for e in ("pretrained", "random"):
        rob = tiles["robustness"][e]
        # only site A has two patients: no other site can be predicted on a held-out patient
        assert (
            rob["leakage"]["target"] == "site" and "two or more sites" in rob["leakage"]["skipped"]
        )
        # each tissue class of the tiny development cohort is at one site: no index here;
        # with the held-out cohort's sites, classes are at two or more
        assert "no site with tiles of two classes" in rob["robustness_index"]["skipped"]
        held = results["tasks"]["tissue-tiles-heldout"]["robustness"][e]["robustness_index"]
        assert held["confounder"] == "site" and held["k"] == 11 and 0 <= held["value"] <= 1
        assert rob["stain_shift"]["drop"] == pytest.approx(
            rob["stain_shift"]["clean"] - rob["stain_shift"]["shifted"]
        )


def test_held_out_tasks_train_on_development_and_score_held_out_data(results, tiny_demo):
    tiles = results["tasks"]["tissue-tiles-heldout"]
    assert tiles["status"] == "ok" and tiles["folds"] == 1
    with open(tiny_demo.runs / "eval" / "tasks" / "tissue-tiles-heldout" / "folds.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["slide_id"][:5] for r in rows if r["test_fold"] == "0"} == {"held_"}
    assert {r["slide_id"][:5] for r in rows if r["test_fold"] == ""} == {"demo_"}
    slides = results["tasks"]["tumour-slides-heldout"]
    assert slides["split"] == "fixed" and slides["n_items"] == 4 and slides["n_train"] == 6
    for task in ("tumour-slides", "tumour-slides-heldout"):
        loc = results["tasks"][task]["scores"]["abmil_localization"]
        for e in ("pretrained", "random"):
            assert loc[e]["n_slides"] >= 1 and 0 <= loc[e]["value"] <= 1
    with open(tiny_demo.runs / "eval" / "leaderboard.csv") as f:
        header = next(csv.reader(f))
    assert "tumour-slides-heldout/abmil_localization" in header


def test_slide_tasks_share_splits_across_encoders_and_seeds(results, tiny_demo):
    slides = results["tasks"]["tumour-slides"]["scores"]["abmil"]
    assert len(slides["pretrained"]["per_seed"]) == 2  # the fixture's slide_seeds
    assert results["tasks"]["survival"]["columns"]["abmil"]["metric"] == "c_index"
    task = tiny_demo.runs / "eval" / "tasks" / "tumour-slides"
    for seed in (0, 1):
        assert (task / f"splits_seed{seed}.csv").is_file()
        for e in ("pretrained", "random"):
            cfg = yaml.safe_load((task / e / f"seed_{seed}" / "config.yaml").read_text())
            assert Path(cfg["splits"]) == task / f"splits_seed{seed}.csv"


def test_pretrained_encoder_leads_the_held_out_tile_task(tiny_demo):
    with open(tiny_demo.runs / "eval" / "leaderboard.csv") as f:
        board = list(csv.DictReader(f))
    assert [r["encoder"] for r in board] == ["pretrained", "random"]
    by = {r["encoder"]: r for r in board}
    # trained on the development tiles, scored on the held-out cohort's (cross-validation
    # by patient on 5 patients cannot train every tissue class of the tiny cohort)
    assert float(by["pretrained"]["tissue-tiles-heldout/knn"]) > float(
        by["random"]["tissue-tiles-heldout/knn"]
    )
    assert float(by["pretrained"]["mean_rank"]) < float(by["random"]["mean_rank"])


def test_a_missing_task_fails_alone_and_cached_features_are_reused(tiny_demo, tmp_path):
    suite = yaml.safe_load((tiny_demo.runs / "eval-suite.yaml").read_text())
    tiles = next(t for t in suite["tasks"] if t["name"] == "tissue-tiles")
    shutil.copytree(tiny_demo.runs / "eval" / "cache", tmp_path / "eval" / "cache")
    cache = tmp_path / "eval" / "cache" / "pretrained" / "tissue-tiles.npz"
    before = cache.stat().st_mtime_ns
    tasks = [{"name": "missing", "kind": "tile", "data": str(tmp_path / "nope.csv")}, tiles]
    cfg = EvaluateConfig(
        encoder_specs=suite["encoder_specs"],
        tasks=tasks,
        out=tmp_path / "eval",
        episodes=5,
        bootstrap=50,
        progress=False,
    )
    assert run(cfg) == 1
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["tasks"]["missing"]["status"] == "failed"
    assert "nope.csv" in results["tasks"]["missing"]["error"]
    assert results["tasks"]["tissue-tiles"]["status"] == "ok"
    assert cache.stat().st_mtime_ns == before
    assert "Failed" in (tmp_path / "eval" / "report.md").read_text()


def test_bad_inputs_fail_their_task_only(tiny_demo, tmp_path):
    features, labels = tiny_demo.runs / "features", tiny_demo.data / "labels.csv"
    with open(labels) as f:
        rows = list(csv.DictReader(f))
    one_class = tmp_path / "one.csv"
    with open(one_class, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "label": "tumor"} for r in rows)
    # encoder 'random' misses one slide's features, then holds another tile set of one slide
    missing, other = tmp_path / "missing", tmp_path / "other"
    for folder in (missing, other):
        shutil.copytree(features, folder)
    first = sorted((missing / "random").glob("*.h5"))[0]
    first.unlink()
    with h5py.File(sorted((other / "random").glob("*.h5"))[0], "r+") as f:
        f.attrs["coords_sha256"] = "0" * 64
    slide = {"kind": "slide", "folds": 3, "mil": MIL}
    tasks = [
        {
            "name": "one-class",
            **slide,
            "features": str(features / "{encoder}"),
            "labels": str(one_class),
        },
        {"name": "uneven", **slide, "features": str(missing / "{encoder}"), "labels": str(labels)},
        {
            "name": "other-tiles",
            **slide,
            "features": str(other / "{encoder}"),
            "labels": str(labels),
        },
        {"name": "one-folder", **slide, "features": str(features), "labels": str(labels)},
    ]
    specs = {"pretrained": "x", "random": "y"}  # slide tasks read features only
    cfg = EvaluateConfig(
        encoder_specs=specs, tasks=tasks, out=tmp_path / "eval", bootstrap=50, progress=False
    )
    assert run(cfg) == 1
    errors = {
        n: t["error"]
        for n, t in json.loads((tmp_path / "eval" / "results.json").read_text())["tasks"].items()
    }
    assert "one class" in errors["one-class"]
    assert "different slides" in errors["uneven"] and first.stem in errors["uneven"]
    assert "different tile sets" in errors["other-tiles"]
    assert "{encoder}" in errors["one-folder"]


def test_cli_names_unknown_encoders(tmp_path, capsys):
    suite = Path(__file__).resolve().parents[2] / "configs" / "benchmarks" / "demo.yaml"
    assert (
        main(["evaluate", "--config", str(suite), "--encoders", "nope", "--out", str(tmp_path)])
        == 1
    )
    assert "unknown encoder 'nope'" in capsys.readouterr().err
