"""The survival head of ``cpath slide-embed`` (a linear Cox model on slide embeddings):
its coefficients against lifelines, a planted task that only PANTHER's variances solve, and
the stage end to end."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.features import FeatureWriter
from pipeline.slide.embed import SlideEmbedConfig, run
from pipeline.slide.head import cox_coefficients, cross_validate_survival, fit_cox
from pipeline.slide.panther import fit_prototypes, mean_pool, panther_embed, sample_tiles


def tied_survival_data(n=40, d=3, seed=0):
    """Standardized (ddof 1, as lifelines normalizes) covariates and times rounded to 0.1,
    so that several events share a time and an event ties with a censoring."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    x = (x - x.mean(0)) / x.std(0, ddof=1)
    time = np.round(rng.exponential(np.exp(-x @ np.array([0.8, -0.5, 0.0]))), 1) + 0.1
    event = (rng.random(n) < 0.7).astype(int)
    return x, time, event


@pytest.mark.parametrize("reg", [0.5, 4.0])
def test_cox_coefficients_match_lifelines(reg):
    pd = pytest.importorskip("pandas")
    lifelines = pytest.importorskip("lifelines")
    x, time, event = tied_survival_data()
    n = len(x)
    tied_events = [t for t in set(time[event > 0]) if (time[event > 0] == t).sum() > 1]
    assert tied_events  # Efron's correction matters
    assert any(((time == t) & (event == 0)).any() for t in set(time[event > 0]))
    # lifelines minimises -sum(log PL) / n + 0.5 * penalizer * ||beta||^2 (l1_ratio 0) on
    # its standardized columns; the head's reg is scikit-learn's C: penalizer = 1 / (reg n)
    frame = pd.DataFrame(x, columns=["a", "b", "c"]).assign(T=time, E=event)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lifelines.CoxPHFitter(penalizer=1.0 / (reg * n), l1_ratio=0.0).fit(frame, "T", "E")
    expected = ref.params_.to_numpy()
    beta = cox_coefficients(x, time, event, penalty=1.0 / (reg * n))
    print(
        f"reg {reg}: lifelines {expected}, head {beta}, max |diff| {abs(beta - expected).max():.1e}"
    )
    np.testing.assert_allclose(beta, expected, rtol=0, atol=1e-4)
    risk = fit_cox(x, time, event, reg=reg, standardize=False)(x)
    np.testing.assert_allclose(risk, x @ expected, rtol=0, atol=5e-4)
    # standardizing the embeddings only rescales the coefficients of the same fit
    scaled = fit_cox(3 * x + 1, time, event, reg=reg)(3 * x + 1)
    np.testing.assert_allclose(scaled, fit_cox(x, time, event, reg=reg)(x), atol=5e-4)


def test_no_events_is_a_clear_error():
    x, time, _ = tied_survival_data()
    with pytest.raises(PipelineError, match="no events"):
        cox_coefficients(x, time, np.zeros(len(x)), penalty=0.1)
    event = np.zeros(len(x), int)
    event[0] = 1  # one event: the fold that tests it trains without one
    with pytest.raises(PipelineError, match="no event among its"):
        cross_validate_survival(x, time, event, folds=5)


CENTRES = np.array([[0.0, 0, 0, 0], [8, 0, 0, 0], [0, 8, 0, 0]])


def planted_survival(seed, n=200, n_tiles=120, effect=8.0):
    """Bags of a 3-component mixture in 4-d whose component 1 has standard deviation
    ``1 + 2 s`` (``s`` uniform in [0, 1]); the log hazard is ``effect * s``, the time
    exponential, censored by an independent exponential (about a quarter censored). The
    means and proportions carry no signal."""
    rng = np.random.default_rng(seed)
    bags, times, events = [], [], []
    for _ in range(n):
        s = rng.uniform()
        std = np.array([1.0, 1.0 + 2.0 * s, 1.0])
        tiles = [rng.normal(CENTRES[k], std[k], size=(n_tiles // 3, 4)) for k in range(3)]
        bags.append(rng.permutation(np.concatenate(tiles)))
        death, censoring = rng.exponential(np.exp(-effect * s)), rng.exponential(0.2)
        times.append(min(death, censoring))
        events.append(int(death <= censoring))
    return bags, np.array(times), np.array(events)


def test_planted_survival_variance_only():
    panther, pooled = [], []
    for seed in range(3):
        bags, time, event = planted_survival(seed)
        protos = fit_prototypes(sample_tiles(bags, 3000, seed), 3, seed=seed, backend="sklearn")
        emb = panther_embed(bags, protos)
        panther.append(cross_validate_survival(emb, time, event, seed=seed)["mean"]["c_index"])
        pooled.append(
            cross_validate_survival(mean_pool(bags), time, event, seed=seed)["mean"]["c_index"]
        )
        print(f"survival seed {seed}: PANTHER {panther[-1]:.3f}, mean pooling {pooled[-1]:.3f}")
    assert np.mean(panther) >= 0.75
    assert np.mean(pooled) <= 0.6


@pytest.fixture
def survival_dir(tmp_path):
    """30 slides of 15 patients (two slides each, sharing time and event) as feature files,
    and a survival labels CSV."""
    bags, time, event = planted_survival(0, n=15, n_tiles=45)
    rng = np.random.default_rng(1)
    root = tmp_path / "feats"
    rows = []
    for i in range(30):
        case = i // 2
        feats = bags[case] + rng.normal(0, 0.1, bags[case].shape)
        sid = f"s{i:02d}"
        writer = FeatureWriter(
            root / f"{sid}.h5",
            len(feats),
            4,
            np.zeros((len(feats), 2)),
            {"encoder": "tiny", "encoder_sha256": "abc", "slide_id": sid},
            "float32",
        )
        writer.write(feats, 0)
        writer.close()
        rows.append(
            {"slide_id": sid, "case_id": f"c{case:02d}", "time": time[case], "event": event[case]}
        )
    rows[0]["event"] = rows[1]["event"] = 1  # at least one event in every fold's training set
    rows[2]["event"] = rows[3]["event"] = 1
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["slide_id", "case_id", "time", "event"])
        w.writeheader()
        w.writerows(rows)
    return tmp_path


def test_stage_survival_head_end_to_end(survival_dir, capsys):
    emb = survival_dir / "panther"
    run(
        SlideEmbedConfig(
            features=survival_dir / "feats",
            prototypes=3,
            samples_per_prototype=30,
            device="cpu",
            out=emb,
        )
    )
    out = survival_dir / "cox"
    cfg = SlideEmbedConfig(
        action="head",
        task="survival",
        embeddings=emb / "embeddings.h5",
        labels=survival_dir / "labels.csv",
        folds=3,
        out=out,
    )
    assert run(cfg) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "survival"
    assert len(metrics["folds"]) == 3
    assert set(metrics["mean"]) == {"c_index"}
    assert 0.0 <= metrics["mean"]["c_index"] <= 1.0
    assert all(0.0 <= f["c_index"] <= 1.0 for f in metrics["folds"])
    with open(out / "predictions.csv") as f:
        preds = list(csv.DictReader(f))
    assert list(preds[0]) == ["slide_id", "case_id", "fold", "time", "event", "risk"]
    assert sorted(p["slide_id"] for p in preds) == [f"s{i:02d}" for i in range(30)]
    with open(out / "splits.csv") as f:
        splits = list(csv.DictReader(f))
    for k in range(3):  # grouped by patient
        tested = {(r["case_id"], r[f"fold_{k}"] == "test") for r in splits}
        assert len(tested) == 15
    assert (out / "config.yaml").is_file()

    # the same splits from a file, through the CLI: the same predictions
    again = survival_dir / "cox_again"
    args = [
        "slide-embed",
        "--action",
        "head",
        "--task",
        "survival",
        "--embeddings",
        str(emb / "embeddings.h5"),
        "--labels",
        str(survival_dir / "labels.csv"),
        "--splits",
        str(out / "splits.csv"),
        "--out",
        str(again),
    ]
    assert main(args) == 0
    with open(again / "predictions.csv") as f:
        repeated = list(csv.DictReader(f))
    assert [p["risk"] for p in repeated] == [p["risk"] for p in preds]

    # a classification labels file for a survival head: the missing columns are named
    (survival_dir / "classes.csv").write_text("slide_id,case_id,label\ns00,c00,1\n")
    bad = [*args[:-6], "--labels", str(survival_dir / "classes.csv"), "--out", str(again)]
    assert main(bad) == 1
    err = capsys.readouterr().err
    assert "missing columns" in err and "event" in err and "time" in err
