"""Slide tasks of `cpath evaluate` on the planted cohort (40 slides of 30 patients, tumour
slides with planted instances): a fixed train/test split from the labels, and the
attention localization AUC as a leaderboard column."""

import csv
import json
import logging
import shutil

import h5py
import numpy as np
import pytest

from pipeline.eval.evaluate import EvaluateConfig, run

MIL = {"epochs": 4, "lr": 2.0e-3, "patience": 4, "model_args": {"hidden": 32, "attn_dim": 16}}
ENCODERS = {"planted": "x", "noisy": "y"}  # slide tasks read features only


@pytest.fixture(scope="module")
def cohort(planted, tmp_path_factory):
    """Two encoders' feature folders of the planted cohort: the planted features, and the
    same tiles with noise on top (a weaker encoder)."""
    root = tmp_path_factory.mktemp("slide_tasks")
    shutil.copytree(planted / "feats", root / "features" / "planted")
    shutil.copytree(planted / "feats", root / "features" / "noisy")
    rng = np.random.default_rng(1)
    for path in sorted((root / "features" / "noisy").glob("*.h5")):
        with h5py.File(path, "r+") as f:
            x = f["features"][:]
            f["features"][:] = x + rng.normal(0, 2.0, x.shape).astype(np.float32)
    return root


def _labels(planted, path, split_of) -> list[dict]:
    """The planted labels with a split column (``split_of(row)``)."""
    with open(planted / "labels.csv", newline="") as f:
        rows = [{**r, "split": split_of(r)} for r in csv.DictReader(f)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _by_patient(r) -> str:
    case = int(r["case_id"][5:])  # case_00 ... case_29; slides 30-39 are second slides
    return "test" if case >= 20 else "val" if case >= 17 else "train"


def _suite(cohort, tasks, out, **kw) -> dict:
    cfg = EvaluateConfig(
        encoder_specs=ENCODERS, tasks=tasks, out=out, bootstrap=50, progress=False, **kw
    )
    code = run(cfg)
    results = json.loads((out / "results.json").read_text())
    return code, results


def _read(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_fixed_split_trains_one_model_per_seed_on_the_train_slides(
    planted, cohort, tmp_path, caplog
):
    rows = _labels(planted, tmp_path / "labels.csv", _by_patient)
    test = {r["slide_id"] for r in rows if r["split"] == "test"}
    train = {r["slide_id"] for r in rows if r["split"] == "train"}
    task = {
        "name": "fixed",
        "kind": "slide",
        "features": str(cohort / "features" / "{encoder}"),
        "labels": str(tmp_path / "labels.csv"),
        "tile_labels": str(planted / "tiles.csv"),
        "folds": 5,  # ignored: the labels have a split
        "seeds": [0, 1],
        "mil": MIL,
    }
    with caplog.at_level(logging.WARNING):
        code, results = _suite(cohort, [task], tmp_path / "eval")
    assert code == 0, results
    assert caplog.text.count("not folds 5") == 1
    r = results["tasks"]["fixed"]
    assert (r["split"], r["n_items"], r["n_train"], r["n_val"]) == ("fixed", 10, 27, 3)
    assert len(test) == 10 and len(train) == 27
    assert r["n_patients"] == 10 and r["folds"] == 1
    runs = tmp_path / "eval" / "tasks" / "fixed"
    for seed in (0, 1):
        splits = _read(runs / f"splits_seed{seed}.csv")
        assert [k for k in splits[0] if k.startswith("fold_")] == ["fold_0"]
        assert {s["slide_id"] for s in splits if s["fold_0"] == "train"} == train
        for e in ENCODERS:
            run_dir = runs / e / f"seed_{seed}"
            preds = _read(run_dir / "predictions.csv")
            assert sorted(p["slide_id"] for p in preds) == sorted(test)
            assert {p["fold"] for p in preds} == {"0"}
            assert sorted(p.name for p in run_dir.glob("fold_*")) == ["fold_0"]  # one model
            located = json.loads((run_dir / "metrics.json").read_text())["localization"]
            assert set(located["per_slide"]) <= test  # scored on test slides only
    for e in ENCODERS:
        assert len(r["scores"]["abmil"][e]["per_seed"]) == 2
        assert set(r["scores"]["abmil_localization"][e]["per_slide"]) <= test
    report = (tmp_path / "eval" / "report.md").read_text()
    assert f"{len(test)} test slides of 10 patients; fixed split" in report


def test_a_fixed_split_refuses_patients_on_both_sides_and_other_roles(planted, cohort, tmp_path):
    base = {"kind": "slide", "features": str(cohort / "features" / "{encoder}"), "mil": MIL}
    # case_00 has s00 (train) and s30 (test)
    _labels(planted, tmp_path / "both.csv", lambda r: "test" if r["slide_id"] == "s30" else "train")
    rows = _labels(planted, tmp_path / "other.csv", lambda r: "train")
    rows[4]["split"] = "holdout"
    with open(tmp_path / "other.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _labels(
        planted, tmp_path / "no_test.csv", lambda r: "train" if r["case_id"] < "case_25" else "val"
    )
    tasks = [
        {"name": "both", **base, "labels": str(tmp_path / "both.csv")},
        {"name": "other", **base, "labels": str(tmp_path / "other.csv")},
        {"name": "no-test", **base, "labels": str(tmp_path / "no_test.csv")},
    ]
    code, results = _suite(cohort, tasks, tmp_path / "eval")
    assert code == 1
    errors = {n: t["error"] for n, t in results["tasks"].items()}
    assert "patient case_00 has slides on both sides" in errors["both"]
    assert "both.csv" in errors["both"] and "s30" in errors["both"]
    assert "other.csv, line 6 (slide s04)" in errors["other"] and "'holdout'" in errors["other"]
    assert "no test rows" in errors["no-test"]
    assert not (tmp_path / "eval" / "tasks" / "both" / "planted").exists()  # nothing trained


def test_localization_is_a_ranked_column_of_seed_averaged_slide_aucs(
    planted, cohort, tmp_path, caplog
):
    features = str(cohort / "features" / "{encoder}")
    located = {
        "name": "loc",
        "kind": "slide",
        "features": features,
        "labels": str(planted / "labels.csv"),
        "tile_labels": str(planted / "tiles.csv"),
        "folds": 2,
        "seeds": [0, 1],
        "mil": MIL,
    }
    plain = {**located, "name": "plain", "seeds": [0], "mil": {**MIL, "epochs": 1}}
    del plain["tile_labels"]
    out = tmp_path / "eval"
    code, results = _suite(cohort, [located, plain], out)
    assert code == 0, results
    r = results["tasks"]["loc"]
    assert r["split"] == "cv" and r["n_items"] == r["n_train"] == 40
    assert r["columns"]["abmil_localization"]["metric"] == "localization_auc"
    with open(out / "leaderboard.csv", newline="") as f:
        board = {row["encoder"]: row for row in csv.DictReader(f)}
    for e in ENCODERS:
        seeds = [
            json.loads((out / "tasks" / "loc" / e / f"seed_{s}" / "metrics.json").read_text())[
                "localization"
            ]["per_slide"]
            for s in (0, 1)
        ]
        common = sorted(set(seeds[0]) & set(seeds[1]))
        assert len(common) == 20  # the tumour slides: positive and negative tiles
        expected = np.mean([np.mean([run[s] for run in seeds]) for s in common])
        entry = r["scores"]["abmil_localization"][e]
        assert entry["value"] == pytest.approx(expected)
        assert entry["n_slides"] == 20 and sorted(entry["per_slide"]) == common
        assert entry["ci"][0] <= entry["value"] <= entry["ci"][1]
        assert float(board[e]["loc/abmil_localization"]) == pytest.approx(expected)
    assert r["scores"]["abmil_localization"]["planted"]["value"] > 0.75  # attends to the signal
    (cmp,) = r["comparisons"]["abmil_localization"]
    assert (cmp["a"], cmp["b"]) == ("planted", "noisy") and 0 <= cmp["p_value"] <= 1
    # ranked: the mean rank averages the ranks of the three columns
    cols = ["loc/abmil", "loc/abmil_localization", "plain/abmil"]
    for e, other in (("planted", "noisy"), ("noisy", "planted")):
        ranks = [
            1.0
            if float(board[e][c]) > float(board[other][c])
            else 2.0
            if float(board[e][c]) < float(board[other][c])
            else 1.5
            for c in cols
        ]
        assert float(board[e]["mean_rank"]) == pytest.approx(np.mean(ranks))
    assert "plain/abmil_localization" not in board["planted"]
    assert "abmil_localization" not in results["tasks"]["plain"]["columns"]
    report = (out / "report.md").read_text()
    assert "loc: abmil localization AUC" in report and "localization AUC:" in report
    # tile labels without a negative tile: no column, and a warning saying why (the trained
    # folds are reused: tile labels only change what is scored)
    only = tmp_path / "positives.csv"
    lines = (planted / "tiles.csv").read_text().splitlines()
    only.write_text("\n".join([lines[0], *(x for x in lines[1:] if x.endswith(",1"))]) + "\n")
    model = out / "tasks" / "loc" / "planted" / "seed_0" / "fold_0" / "model.ckpt"
    before = model.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING):
        code, results = _suite(cohort, [{**located, "tile_labels": str(only)}], out)
    assert code == 0 and model.stat().st_mtime_ns == before
    assert "abmil_localization" not in results["tasks"]["loc"]["columns"]
    assert "no test slide has both positive and negative tiles" in caplog.text


def test_transfer_arm_is_scored_beside_training_from_scratch(planted, tmp_path):
    """``transfer: {encoder: model.ckpt}`` adds ``<encoder> (transferred)``: the same splits
    and settings, each fold started from the pretrained aggregator, compared with the rest."""
    from pipeline.mil.train import TrainMILConfig
    from pipeline.mil.training import train_cv

    features = tmp_path / "features" / "planted"
    shutil.copytree(planted / "feats", features)
    for path in features.glob("*.h5"):  # what `cpath extract` records of its encoder
        with h5py.File(path, "r+") as f:
            f.attrs.update({"encoder": "x", "encoder_sha256": "e" * 64, "pooling": "cls"})
    source = TrainMILConfig(
        features=features,
        labels=planted / "labels.csv",
        out=tmp_path / "source",
        folds=2,
        bootstrap=0,
        progress=False,
        device="cpu",
        **MIL,
    )
    train_cv(source)
    task = {
        "name": "transfer",
        "kind": "slide",
        "features": str(tmp_path / "features" / "{encoder}"),
        "labels": str(planted / "labels.csv"),
        "folds": 2,
        "mil": {**MIL, "shots": 4},
        "transfer": {"planted": str(tmp_path / "source" / "fold_0" / "model.ckpt")},
    }
    cfg = EvaluateConfig(
        encoder_specs={"planted": "x"},
        tasks=[task],
        out=tmp_path / "eval",
        bootstrap=20,
        progress=False,
    )
    assert run(cfg) == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())["tasks"]["transfer"]
    assert set(result["scores"]["abmil"]) == {"planted", "planted (transferred)"}
    (pair,) = result["comparisons"]["abmil"]
    assert {pair["a"], pair["b"]} == {"planted", "planted (transferred)"}
    run_dir = tmp_path / "eval" / "tasks" / "transfer" / "planted+transfer" / "seed_0"
    report = json.loads((run_dir / "fold_1" / "transfer.json").read_text())
    assert report["source"] == task["transfer"]["planted"]
    scratch = tmp_path / "eval" / "tasks" / "transfer" / "planted" / "seed_0"
    for k in range(2):  # both arms trained on the same few-shot slides
        assert (run_dir / f"fold_{k}" / "train_slides.txt").read_text() == (
            scratch / f"fold_{k}" / "train_slides.txt"
        ).read_text()
    task["transfer"] = {"other": task["transfer"]["planted"]}
    cfg.out = tmp_path / "eval2"
    run(cfg)
    failed = json.loads((tmp_path / "eval2" / "results.json").read_text())["tasks"]["transfer"]
    assert failed["status"] == "failed" and "other" in failed["error"]
