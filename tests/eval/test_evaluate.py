"""`cpath evaluate` on the tiny cohort: the 200-step pretrained encoder against its random init."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import h5py
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.eval.evaluate import EvaluateConfig, run
from pipeline.extract import ExtractConfig
from pipeline.extraction import extract

MIL = {"epochs": 6, "lr": 2.0e-3, "patience": 6, "model_args": {"hidden": 32, "attn_dim": 16}}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_prep, tiny_cohort, tiny_run):
    root = tmp_path_factory.mktemp("eval")
    enc = tiny_run / "encoder"
    specs = {"pretrained": str(enc), "random": f"random:{enc}"}
    for name, spec in specs.items():
        extract(ExtractConfig(coords=tiny_prep / "coords", encoder=spec, out=root / "features" / name,
                              batch_size=64, workers=0, precision="fp32", progress=False))  # fmt: skip
    slide = {"kind": "slide", "features": str(root / "features" / "{encoder}"),
             "labels": str(tiny_cohort / "labels.csv"), "folds": 3}  # fmt: skip
    tasks = [
        {"name": "tiles", "kind": "tile", "sites": str(tiny_cohort / "labels.csv"),
         "data": {"coords": str(tiny_prep / "coords"), "demo": str(tiny_cohort), "per_slide": 40}},
        {"name": "slides", **slide, "seeds": [0, 1], "mil": MIL},
        {"name": "survival", **slide, "task": "survival", "mil": {**MIL, "survival_loss": "cox"}},
        {"name": "missing", "kind": "tile", "data": str(root / "nope.csv")},
    ]  # fmt: skip
    cfg = EvaluateConfig(encoder_specs=specs, tasks=tasks, out=root / "eval", episodes=20,
                         bootstrap=200, progress=False)  # fmt: skip
    return root, cfg, run(cfg)


def test_suite_runs_every_task_and_reports_the_broken_one(evaluated):
    root, cfg, code = evaluated
    assert code == 1  # one task failed
    results = json.loads((cfg.out / "results.json").read_text())
    status = {name: t["status"] for name, t in results["tasks"].items()}
    assert status == {"tiles": "ok", "slides": "ok", "survival": "ok", "missing": "failed"}
    assert "nope.csv" in results["tasks"]["missing"]["error"]
    tiles = results["tasks"]["tiles"]
    for col in ("linear", "knn"):
        for e in ("pretrained", "random"):
            entry = tiles["scores"][col][e]
            assert entry["ci"][0] <= entry["value"] <= entry["ci"][1]
            assert set(entry["metrics"]) == {"auc", "balanced_accuracy", "f1"}
        (cmp,) = tiles["comparisons"][col]
        assert (cmp["a"], cmp["b"]) == ("pretrained", "random") and 0 <= cmp["p_value"] <= 1
    assert set(tiles["fewshot"]["pretrained"]) >= {"1", "2", "4", "8", "16"}
    for e in ("pretrained", "random"):
        rob = tiles["robustness"][e]
        assert (
            rob["leakage"]["target"] == "site" and 0 <= rob["leakage"]["slide_probe_accuracy"] <= 1
        )
        assert rob["stain_shift"]["drop"] == pytest.approx(
            rob["stain_shift"]["clean"] - rob["stain_shift"]["shifted"]
        )
    slides = results["tasks"]["slides"]["scores"]["abmil"]
    assert len(slides["pretrained"]["per_seed"]) == 2
    assert results["tasks"]["survival"]["columns"]["abmil"]["metric"] == "c_index"
    # both encoders were trained on the same splits
    runs = cfg.out / "tasks" / "slides"
    for seed in (0, 1):
        for e in ("pretrained", "random"):
            assert (runs / e / f"seed_{seed}" / "splits.csv").is_file() is False
            assert (runs / e / f"seed_{seed}" / "predictions.csv").is_file()
        assert (runs / f"splits_seed{seed}.csv").is_file()


def test_pretrained_encoder_leads_the_tile_tasks(evaluated):
    _, cfg, _ = evaluated
    with open(cfg.out / "leaderboard.csv") as f:
        board = list(csv.DictReader(f))
    assert [r["encoder"] for r in board] == ["pretrained", "random"]
    by = {r["encoder"]: r for r in board}
    for col in ("tiles/linear", "tiles/knn"):
        assert float(by["pretrained"][col]) > float(by["random"][col])
    assert float(by["pretrained"]["mean_rank"]) < float(by["random"]["mean_rank"])


def test_report_renders_with_its_figures(evaluated):
    _, cfg, _ = evaluated
    page = (cfg.out / "report.html").read_text()
    sources = [s.split("'")[0] for s in page.split("<img src='")[1:]]
    assert len(sources) >= 8  # ROC, confusion per probe, few-shot, embedding, slide ROC, KM ...
    for src in sources:
        with Image.open(cfg.out / src) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert "Leaderboard" in (cfg.out / "report.md").read_text()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:  # rendered by a real browser: every figure loads
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                              "--virtual-time-budget=5000", "--dump-dom",
                              (cfg.out / "report.html").as_uri()],
                             capture_output=True, text=True, timeout=120).stdout  # fmt: skip
        assert f'data-images-loaded="{len(sources)}/{len(sources)}"' in dom


def test_rerun_reuses_cached_features(evaluated):
    root, cfg, _ = evaluated
    cache = cfg.out / "cache" / "pretrained" / "tiles.npz"
    before = cache.stat().st_mtime_ns
    cfg2 = EvaluateConfig(**{**cfg.__dict__, "tasks": cfg.tasks[:1], "out": cfg.out,
                             "encoders": "pretrained"})  # fmt: skip
    assert run(cfg2) == 0
    assert cache.stat().st_mtime_ns == before


def test_bad_inputs_fail_their_task_only(evaluated, tmp_path, tiny_cohort):
    root, cfg, _ = evaluated
    one_class = tmp_path / "one.csv"
    with open(tiny_cohort / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    with open(one_class, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "label": "tumor"} for r in rows)
    # encoder 'random' misses one slide's features, then holds another tile set of one slide
    missing, other = tmp_path / "missing", tmp_path / "other"
    for folder in (missing, other):
        shutil.copytree(root / "features", folder)
    first = sorted((missing / "random").glob("*.h5"))[0]
    first.unlink()
    with h5py.File(sorted((other / "random").glob("*.h5"))[0], "r+") as f:
        f.attrs["coords_sha256"] = "0" * 64
    labels = str(tiny_cohort / "labels.csv")
    slide = {"kind": "slide", "folds": 3, "mil": MIL}
    tasks = [{"name": "one-class", **slide, "features": str(root / "features" / "{encoder}"),
              "labels": str(one_class)},
             {"name": "uneven", **slide, "features": str(missing / "{encoder}"), "labels": labels},
             {"name": "other-tiles", **slide, "features": str(other / "{encoder}"), "labels": labels}]  # fmt: skip
    cfg2 = EvaluateConfig(encoder_specs=cfg.encoder_specs, tasks=tasks, out=tmp_path / "eval",
                          bootstrap=50, progress=False)  # fmt: skip
    assert run(cfg2) == 1
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "one class" in results["tasks"]["one-class"]["error"]
    assert (
        "different slides" in results["tasks"]["uneven"]["error"]
        and first.stem in results["tasks"]["uneven"]["error"]
    )
    assert "different tile sets" in results["tasks"]["other-tiles"]["error"]


def test_cli_selects_and_adds_encoders(tmp_path, capsys):
    suite = Path(__file__).resolve().parents[2] / "configs" / "benchmarks" / "demo.yaml"
    assert (
        main(["evaluate", "--config", str(suite), "--encoders", "nope", "--out", str(tmp_path)])
        == 1
    )
    assert "unknown encoder 'nope'" in capsys.readouterr().err
