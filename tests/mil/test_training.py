"""Cross-validated MIL training on feature files with a planted signal."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.features import FeatureWriter, read_features
from pipeline.mil.metrics import bootstrap_ci, classification_metrics, concordance_index
from pipeline.mil.train import TrainMILConfig
from pipeline.mil.training import cox_loss, nll_survival_loss, survival_risk, train_cv

D = 16


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """40 slides of 30 patients: tumour slides hold 4-8 instances shifted along one direction;
    survival time falls with the number of shifted instances."""
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    direction = rng.normal(size=D)
    direction /= np.linalg.norm(direction)
    rows, tiles = [], ["slide_id,index,positive"]
    for i in range(40):
        case = f"case_{min(i, 29):02d}" if i < 30 else f"case_{i - 30:02d}"
        tumour = i % 2 == 1
        n = int(rng.integers(20, 60))
        feats = rng.normal(size=(n, D)).astype(np.float32)
        k = int(rng.integers(4, 9)) if tumour else 0
        feats[:k] += 4.0 * direction
        if tumour:  # the planted instances are the tumour tiles
            tiles += [f"s{i:02d},{j},{int(j < k)}" for j in range(n)]
        writer = FeatureWriter(
            root / "feats" / f"s{i:02d}.h5", n, D, np.zeros((n, 2)), {}, "float32"
        )
        writer.write(feats, 0)
        writer.close()
        time = float(np.clip(60 - 6 * k + rng.normal(0, 3), 1, None))
        rows.append(
            {
                "slide_id": f"s{i:02d}",
                "case_id": case,
                "label": "tumor" if tumour else "normal",
                "time": round(time, 1),
                "event": int(rng.random() < 0.8),
            }
        )
    (root / "tiles.csv").write_text("\n".join(tiles) + "\n")
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def cfg(planted, out=None, **kw):
    base = {
        "features": planted / "feats",
        "labels": planted / "labels.csv",
        "out": out,
        "folds": 3,
        "epochs": 8,
        "patience": 8,
        "lr": 2e-3,
        "progress": False,
        "bootstrap": 200,
        "model_args": {"hidden": 64, "attn_dim": 32},
    }
    return TrainMILConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def classified(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("abmil")
    return out, train_cv(cfg(planted, out))


def test_classification_cross_validation_finds_the_planted_signal(classified):
    out, metrics = classified
    assert metrics["pooled"]["auc"]["value"] > 0.9
    lo, hi = metrics["pooled"]["auc"]["ci"]
    assert lo <= metrics["pooled"]["auc"]["value"] <= hi
    with open(out / "predictions.csv") as f:
        preds = list(csv.DictReader(f))
    assert len(preds) == 40 and {"prob_normal", "prob_tumor", "fold", "case_id"} <= set(preds[0])
    with open(out / "splits.csv") as f:
        splits = list(csv.DictReader(f))
    for k in range(3):  # no patient on both sides of a fold
        test = {r["case_id"] for r in splits if r[f"fold_{k}"] == "test"}
        train = {r["case_id"] for r in splits if r[f"fold_{k}"] != "test"}
        assert not test & train
    assert all((out / f"fold_{k}" / "model.ckpt").is_file() for k in range(3))
    saved = json.loads((out / "metrics.json").read_text())
    assert len(saved["folds"]) == 3 and set(saved["mean"]) == {"auc", "balanced_accuracy", "f1"}


def test_rerun_reuses_finished_folds_and_splits(planted, classified):
    out, metrics = classified
    stamp = (out / "fold_0" / "model.ckpt").stat().st_mtime_ns
    assert train_cv(cfg(planted, out)) == metrics
    assert (out / "fold_0" / "model.ckpt").stat().st_mtime_ns == stamp
    train_cv(cfg(planted, out, epochs=1, patience=1))  # other settings: folds are trained again
    assert (out / "fold_0" / "model.ckpt").stat().st_mtime_ns != stamp


def test_rewritten_feature_files_retrain_the_folds(planted, tmp_path):
    feats = tmp_path / "feats"
    shutil.copytree(planted / "feats", feats)
    run = cfg(planted, tmp_path / "run", features=feats, epochs=1, bootstrap=0)
    train_cv(run)
    stamp = (tmp_path / "run" / "fold_0" / "model.ckpt").stat().st_mtime_ns
    train_cv(run)
    assert (tmp_path / "run" / "fold_0" / "model.ckpt").stat().st_mtime_ns == stamp
    rewritten = feats / "s00.h5"  # as a new extraction of the slide would
    rewritten.write_bytes(rewritten.read_bytes())
    train_cv(run)
    assert (tmp_path / "run" / "fold_0" / "model.ckpt").stat().st_mtime_ns != stamp


def test_survival_ranks_patients_by_the_planted_risk(planted, tmp_path):
    metrics = train_cv(
        cfg(
            planted,
            tmp_path,
            task="survival",
            survival_loss="cox",
            batch_size=8,
            epochs=20,
            patience=20,
            lr=5e-3,
            val_share=0.0,
        )
    )
    assert metrics["pooled"]["c_index"]["value"] > 0.7
    with open(tmp_path / "predictions.csv") as f:
        assert {"time", "event", "risk"} <= set(next(csv.DictReader(f)))


def test_discrete_time_nll_matches_its_formula():
    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]], requires_grad=True)
    bins, event = torch.tensor([1, 0]), torch.tensor([1.0, 0.0])
    h = torch.sigmoid(logits.detach())
    observed = -(torch.log(1 - h[0, 0]) + torch.log(h[0, 1]))  # survived bin 0, died in bin 1
    censored = -torch.log(1 - h[1, 0])  # alive at the end of bin 0
    loss = nll_survival_loss(logits, bins, event)
    assert loss.item() == pytest.approx(((observed + censored) / 2).item(), rel=1e-5)
    loss.backward()
    assert logits.grad[0, 1] < 0 and logits.grad[1, 0] > 0  # raise the death bin's hazard
    risk = survival_risk(torch.tensor([[3.0, 3.0, 3.0], [-3.0, -3.0, -3.0]]), "nll")
    assert risk[0] > risk[1]
    assert cox_loss(
        torch.tensor([2.0, 0.0]), torch.tensor([1.0, 5.0]), torch.tensor([1.0, 1.0])
    ) < cox_loss(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 5.0]), torch.tensor([1.0, 1.0]))


def test_metrics_against_known_values():
    assert concordance_index([1, 2, 3], [1, 1, 1], [3, 2, 1]) == 1.0
    assert concordance_index([1, 2, 3], [1, 1, 1], [1, 2, 3]) == 0.0
    assert np.isnan(concordance_index([1, 2, 3], [0, 0, 0], [1, 2, 3]))  # no comparable pair
    m = classification_metrics(
        np.array([0, 1, 1, 0]), np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
    )
    assert m["auc"] == 1.0 and m["balanced_accuracy"] == 0.75
    lo, hi = bootstrap_ci(lambda x: float(np.mean(x)), np.arange(100.0), n=300)
    assert lo < 49.5 < hi and hi - lo < 25


def test_cli_errors(tmp_path, capsys):
    assert main(["train-mil", "--labels", str(tmp_path / "x.csv")]) == 1
    assert "needs --features" in capsys.readouterr().err


def test_bad_inputs_give_clear_errors(planted, tmp_path):
    import shutil

    from pipeline.errors import PipelineError

    feats = tmp_path / "feats"
    shutil.copytree(planted / "feats", feats)
    labels = (planted / "labels.csv").read_text()
    base = {"features": feats, "out": tmp_path / "run"}

    (tmp_path / "extra.csv").write_text(labels + "ghost,case_x,tumor,10,1\n")
    with pytest.raises(PipelineError, match="1 labelled slides have no feature file.*ghost"):
        train_cv(cfg(planted, **base, labels=tmp_path / "extra.csv"))

    one = "\n".join(line for line in labels.splitlines() if ",tumor," not in line) + "\n"
    (tmp_path / "one.csv").write_text(one)
    with pytest.raises(PipelineError, match="only one class"):
        train_cv(cfg(planted, **base, labels=tmp_path / "one.csv"))

    writer = FeatureWriter(feats / "s00.h5", 0, D, np.zeros((0, 2)), {}, "float32")
    writer.close()  # s00 now has no tiles
    with pytest.raises(PipelineError, match="1 slides have no tiles.*s00"):
        train_cv(cfg(planted, **base, labels=planted / "labels.csv"))

    writer = FeatureWriter(feats / "s00.h5", 5, 2 * D, np.zeros((5, 2)), {}, "float32")
    writer.write(np.zeros((5, 2 * D), np.float32), 0)
    writer.close()  # s00 now has features of another size
    with pytest.raises(PipelineError, match="feature files of different sizes"):
        train_cv(cfg(planted, **base, labels=planted / "labels.csv"))


def _labels(planted, path, drop=(), case_id=True, relabel=()):
    """A copy of the planted labels: without slides ``drop``, the ``case_id`` column or with
    the labels of ``relabel`` swapped."""
    with open(planted / "labels.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["slide_id"] not in drop]
    for r in rows:
        if r["slide_id"] in relabel:
            r["label"] = "normal" if r["label"] == "tumor" else "tumor"
        if not case_id:
            del r["case_id"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_labels_fixed_in_place_retrain_the_folds(planted, tmp_path):
    labels = _labels(planted, tmp_path / "labels.csv")
    run = cfg(planted, tmp_path / "run", labels=labels, epochs=1, bootstrap=0)
    train_cv(run)
    stamp = (tmp_path / "run" / "fold_0" / "model.ckpt").stat().st_mtime_ns
    _labels(planted, labels, relabel={"s00"})  # the same path, another label of s00
    train_cv(run)
    assert (tmp_path / "run" / "fold_0" / "model.ckpt").stat().st_mtime_ns != stamp
    (s00,) = (r for r in _read(tmp_path / "run" / "predictions.csv") if r["slide_id"] == "s00")
    assert s00["label"] == "tumor"  # the corrected label, not the one the folds were trained on


def test_splits_are_made_again_when_slides_patients_or_settings_change(planted, tmp_path, caplog):
    out = tmp_path / "run"
    labels = _labels(planted, tmp_path / "labels.csv", drop={"s39"}, case_id=False)
    train_cv(cfg(planted, out, labels=labels, epochs=1, bootstrap=0))
    assert "no case_id column" in caplog.text
    _labels(planted, labels)  # s39 and the patients (two slides of some) added
    caplog.clear()
    metrics = train_cv(cfg(planted, out, labels=labels, epochs=1, bootstrap=0))
    assert "made again" in caplog.text and metrics["n_slides"] == 40
    splits = _read(out / "splits.csv")
    for k in range(3):  # grouped by the patients now known
        test = {r["case_id"] for r in splits if r[f"fold_{k}"] == "test"}
        assert not test & {r["case_id"] for r in splits if r[f"fold_{k}"] != "test"}
    metrics = train_cv(cfg(planted, out, labels=labels, folds=2, epochs=1, bootstrap=0))
    assert len(metrics["folds"]) == 2 and "fold_2" not in _read(out / "splits.csv")[0]
    train_cv(cfg(planted, out, labels=labels, folds=2, seed=1, epochs=1, bootstrap=0))
    assert _read(out / "splits.csv") != splits


def test_given_splits_must_hold_every_labelled_slide(planted, tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.mil.splits import make_splits, write_splits

    rows = [r for r in _read(planted / "labels.csv") if r["slide_id"] != "s39"]
    write_splits(tmp_path / "splits.csv", make_splits(rows, 3))
    with pytest.raises(PipelineError, match="1 labelled slides are not in them.*s39"):
        train_cv(cfg(planted, tmp_path / "run", splits=tmp_path / "splits.csv"))


def test_reporting_settings_do_not_retrain_finished_folds(planted, tmp_path):
    train_cv(cfg(planted, tmp_path / "run", epochs=1, bootstrap=0))
    stamp = (tmp_path / "run" / "fold_0" / "model.ckpt").stat().st_mtime_ns
    shutil.copy(tmp_path / "run" / "splits.csv", tmp_path / "splits.csv")
    metrics = train_cv(
        cfg(
            planted,
            tmp_path / "x" / ".." / "run",
            epochs=1,
            bootstrap=30,
            progress=True,
            device="cpu",
            splits=tmp_path / "splits.csv",
        )
    )
    assert (tmp_path / "run" / "fold_0" / "model.ckpt").stat().st_mtime_ns == stamp
    assert metrics["pooled"]["auc"]["ci"][0] <= metrics["pooled"]["auc"]["value"]


@pytest.mark.parametrize("survival_loss", ["cox", "nll"])
def test_dsmil_instance_classifier_learns_in_survival_tasks(survival_loss):
    """Its critical instance is an argmax: only the max-instance loss reaches the classifier."""
    from pipeline.mil.training import MILModule

    torch.manual_seed(0)
    n_out = 1 if survival_loss == "cox" else 4
    module = MILModule(
        "dsmil", D, n_out, {"q_dim": 8}, "survival", 1e-3, 0.0, 1, 0.7, survival_loss
    )
    batch = {
        "x": torch.randn(4, 10, D),
        "mask": torch.ones(4, 10, dtype=torch.bool),
        "y": torch.zeros(4),
        "time": torch.tensor([5.0, 2.0, 9.0, 1.0]),
        "event": torch.tensor([1.0, 1.0, 0.0, 1.0]),
        "bin": torch.tensor([1, 0, 3, 0]),
    }
    module.train()
    module.loss(batch).backward()
    grad = module.model.instance_classifier.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_every_setting_is_either_training_or_reporting():
    """A new option must be sorted: into the fingerprint of finished folds or out of it."""
    from dataclasses import fields

    from pipeline.mil.training import (
        OPTIONAL_SETTINGS,
        STRATEGY_SETTINGS,
        TRAINING_SETTINGS,
        TRANSFER_SETTINGS,
    )

    # by content or splits
    elsewhere = {"features", "labels", "splits", "folds", "val_share", "teacher_init", "init_from"}
    reporting = {
        "tile_labels",
        "out",
        "ordinal",
        "bootstrap",
        "missing",
        "device",
        "progress",
        "store",
        "memory_budget_gb",
    }
    assert {f.name for f in fields(TrainMILConfig)} == set(TRAINING_SETTINGS) | set(
        STRATEGY_SETTINGS
    ) | set(TRANSFER_SETTINGS) | set(OPTIONAL_SETTINGS) | elsewhere | reporting


def _roles(out, k: int) -> dict[str, list[str]]:
    splits = _read(out / "splits.csv")
    return {
        role: [r["slide_id"] for r in splits if r[f"fold_{k}"] == role]
        for role in ("train", "val", "test")
    }


def _outputs(module, planted, slide_ids, bf16: bool = False) -> torch.Tensor:
    """``N x C`` logits of the whole bags, one at a time, as the module computes them."""
    from pipeline.features import read_features

    module.eval()
    logits = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for s in slide_ids:
            x = torch.from_numpy(np.asarray(read_features(planted / "feats" / f"{s}.h5")[0]))
            x = x.float()[None]  # 1 x N x D
            mask = torch.ones(x.shape[:2], dtype=torch.bool)
            logits.append(module(x, mask)["logits"].float())
    return torch.cat(logits)


def test_cox_validation_loss_is_the_cox_loss_of_the_per_bag_risks(planted, tmp_path):
    from pipeline.mil.training import MILModule

    out = tmp_path / "run"
    metrics = train_cv(
        cfg(
            planted,
            out,
            task="survival",
            survival_loss="cox",
            epochs=1,
            val_share=0.3,
            bootstrap=20,
        )
    )
    val = _roles(out, 0)["val"]
    labels = {r["slide_id"]: r for r in _read(planted / "labels.csv")}
    assert len(val) >= 5 and sum(int(labels[s]["event"]) for s in val) >= 2
    logged = [float(r["val_loss"]) for r in _read(out / "fold_0" / "metrics.csv") if r["val_loss"]]
    module = MILModule.load_from_checkpoint(out / "fold_0" / "model.ckpt", map_location="cpu")
    risk = _outputs(module, planted, val)[:, 0]  # N
    time = torch.tensor([float(labels[s]["time"]) for s in val])
    event = torch.tensor([float(labels[s]["event"]) for s in val])
    assert logged == [pytest.approx(cox_loss(risk, time, event).item(), abs=1e-5)]
    assert {"c_index", "td_auc", "ibs"} == set(metrics["pooled"])
    preds = _read(out / "predictions.csv")
    cols = [k for k in preds[0] if k.startswith("surv_")]
    surv = np.array([[float(r[k]) for k in cols] for r in preds])  # slides x 3 horizons
    assert len(cols) == 3 and ((surv >= 0) & (surv <= 1)).all()
    assert (np.diff(surv, axis=1) <= 0).all()  # survival falls with time


def test_discrete_time_predictions_use_the_bins_of_the_training_fold(planted, tmp_path):
    from pipeline.mil.training import MILModule, bin_edges, discrete_survival, read_labels

    out = tmp_path / "run"
    metrics = train_cv(
        cfg(
            planted, out, task="survival", survival_loss="nll", epochs=1, val_share=0.0, bootstrap=0
        )
    )
    assert np.isfinite(metrics["pooled"]["ibs"]["value"])
    labels = {r["slide_id"]: r for r in read_labels(planted / "labels.csv", "survival")}
    preds = {r["slide_id"]: r for r in _read(out / "predictions.csv")}
    cols = [k for k in next(iter(preds.values())) if k.startswith("surv_")]
    horizons = [float(k[5:]) for k in cols]
    for k in range(3):
        roles = _roles(out, k)
        edges = bin_edges([labels[s] for s in roles["train"]], 4)
        module = MILModule.load_from_checkpoint(
            out / f"fold_{k}" / "model.ckpt", map_location="cpu"
        )
        logits = _outputs(module, planted, roles["test"])  # N x 4
        got = np.array([[float(preds[s][c]) for c in cols] for s in roles["test"]])
        np.testing.assert_allclose(got, discrete_survival(logits, edges, horizons), atol=1e-6)
        risk = [float(preds[s]["risk"]) for s in roles["test"]]
        np.testing.assert_allclose(risk, survival_risk(logits, "nll").numpy(), atol=1e-6)


def test_predictions_are_the_trained_modules_outputs_at_its_precision(planted, tmp_path):
    from pipeline.mil.training import MILModule

    out = tmp_path / "run"
    train_cv(
        cfg(
            planted,
            out,
            folds=2,
            epochs=1,
            val_share=0.0,
            bootstrap=0,
            device="cpu",
            precision="bf16-mixed",
        )
    )
    preds = {r["slide_id"]: r for r in _read(out / "predictions.csv")}
    test = _roles(out, 0)["test"]
    got = np.array([[float(preds[s][f"prob_{c}"]) for c in ("normal", "tumor")] for s in test])
    module = MILModule.load_from_checkpoint(out / "fold_0" / "model.ckpt", map_location="cpu")
    bf16 = torch.softmax(_outputs(module, planted, test, bf16=True), -1).numpy()
    fp32 = torch.softmax(_outputs(module, planted, test), -1).numpy()
    np.testing.assert_allclose(got, bf16, atol=1e-6)  # as trained: bf16 autocast
    assert np.abs(got - fp32).max() > 1e-4  # which differs from fp32 here


def test_localization_auc_of_the_fold_models_against_tile_labels(planted, tmp_path):
    """Each tumour slide's planted instances are its positive tiles: the localization AUC
    of a reused run equals roc_auc_score of its fold model's tile scores, slide by slide."""
    from sklearn.metrics import roc_auc_score

    from pipeline.mil.drawing import tile_scores
    from pipeline.mil.training import MILModule

    out = tmp_path / "run"
    train_cv(cfg(planted, out))
    before = (out / "fold_0" / "model.ckpt").stat().st_mtime_ns
    metrics = train_cv(cfg(planted, out, tile_labels=planted / "tiles.csv"))
    assert (out / "fold_0" / "model.ckpt").stat().st_mtime_ns == before  # a reporting setting
    loc = metrics["localization"]
    assert loc["n_slides"] == 20 and set(loc["per_slide"]) == {f"s{i:02d}" for i in range(1, 40, 2)}
    assert loc["auc"] > 0.9 and loc["ci"][0] <= loc["auc"] <= loc["ci"][1]
    splits = _read(out / "splits.csv")
    for slide_id in ("s01", "s02", "s17"):
        if slide_id not in loc["per_slide"]:
            continue  # normal slides have no positive tile
        fold = next(r for r in splits if r["slide_id"] == slide_id)
        k = next(int(c[5:]) for c, v in fold.items() if c.startswith("fold_") and v == "test")
        module = MILModule.load_from_checkpoint(
            out / f"fold_{k}" / "model.ckpt", map_location="cpu"
        )
        feats, _, _ = read_features(planted / "feats" / f"{slide_id}.h5")
        labels = [
            int(r.split(",")[2])
            for r in (planted / "tiles.csv").read_text().splitlines()[1:]
            if r.startswith(slide_id + ",")
        ]
        expected = roc_auc_score(labels, tile_scores(module, feats))
        assert loc["per_slide"][slide_id] == pytest.approx(expected)
    assert json.loads((out / "metrics.json").read_text())["localization"]["auc"] == loc["auc"]
    quiet = train_cv(cfg(planted, out, tile_labels=planted / "tiles.csv", bootstrap=0))
    assert quiet["localization"]["auc"] == loc["auc"] and "ci" not in quiet["localization"]
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,index,positive\ns01,999,1\ns01,0,0\n")
    with pytest.raises(PipelineError, match="slide s01 has .* tiles, but a label names tile 999"):
        train_cv(cfg(planted, out, tile_labels=bad))


def test_class_weighted_cross_entropy_weighs_classes_by_their_inverse_share():
    """n / (K n_c) of the fold's training slides (scikit-learn's "balanced"), a class absent
    from them weighted 0; the loss is torch's weighted cross-entropy."""
    import torch.nn.functional as F

    from pipeline.mil.training import MILModule, Targets, class_weights

    rows = [{"slide_id": f"s{i}", "case_id": f"c{i}", "label": "ab"[i >= 6]} for i in range(8)]
    rows.append({"slide_id": "s8", "case_id": "c8", "label": "c"})
    targets = Targets(rows, "classification", ["a", "b", "c"], 4)
    train = [f"s{i}" for i in range(8)]  # 6 of a, 2 of b, none of c
    cfg = TrainMILConfig(class_weighted=True)
    assert class_weights(cfg, targets, train, ["a", "b", "c"]) == pytest.approx(
        [8 / (2 * 6), 8 / (2 * 2), 0.0]
    )
    assert class_weights(TrainMILConfig(), targets, train, ["a", "b", "c"]) is None
    module = MILModule(
        "mean", 4, 3, {}, "classification", 1e-3, 0.0, 2, 0.7, "nll", class_weights=[0.5, 2.0, 0.0]
    )
    logits, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    expected = F.cross_entropy(logits, y, weight=torch.tensor([0.5, 2.0, 0.0]))
    assert module.target_loss(logits, {"y": y}).item() == pytest.approx(expected.item())
    assert module.target_loss(logits, {"y": y}).item() != pytest.approx(
        F.cross_entropy(logits, y).item()
    )


def test_without_validation_the_model_is_the_last_epochs(planted, tmp_path):
    cfg = TrainMILConfig(
        features=planted / "feats",
        labels=planted / "labels.csv",
        out=tmp_path / "run",
        folds=2,
        val_share=0.0,
        epochs=3,
        batch_size=4,
        model_args={"hidden": 8, "attn_dim": 4},
        bootstrap=0,
        progress=False,
        device="cpu",
    )
    train_cv(cfg)
    ckpt = torch.load(tmp_path / "run" / "fold_0" / "model.ckpt", weights_only=False)
    with open(tmp_path / "run" / "splits.csv", newline="") as f:
        n_train = sum(r["fold_0"] == "train" for r in csv.DictReader(f))
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 3 * -(-n_train // 4)
