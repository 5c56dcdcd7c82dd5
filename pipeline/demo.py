"""``cpath demo``: the whole pipeline on the demo cohort built from real H&E texture.

Stages, each reusing what an earlier run finished (so a rerun only does what is missing):

1. cohort: build the development and held-out cohorts' slides, labels and ground-truth
   masks (if missing);
2. preprocess: tissue detection and tiling at 0.5 mpp, QC thumbnails, for both cohorts;
   the lists of each cohort's coords files and the tumour / other label of every tile;
3. stain: fit Macenko to a reference tile of the development cohort, before/after figure
   and slide-clustering report;
4. pretrain: the tiny DINOv2 preset with stain augmentation, on development tiles only;
5. extract: stain-normalized features of both cohorts with that encoder and with the
   same architecture at random init;
6. train-mil: ABMIL (``configs/mil/abmil-small.yaml``), 5 folds grouped by patient of the
   development cohort, on both feature sets; one survival run (Cox);
7. evaluate: ``configs/benchmarks/demo.yaml`` for both encoders: tissue-type tiles and
   tumour slides cross-validated on the development cohort and trained on it, scored on
   the held-out cohort;
8. heatmaps: attention of the pretrained ABMIL over tumour slides;
9. report: ``RUNS/report.html`` linking every stage's outputs.

The demo stops at the first failing stage with a message naming it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import save_config
from pipeline.data.demo import describe_cohort, make_cohort, tile_labels
from pipeline.data.textures import COHORTS, DEVELOPMENT
from pipeline.errors import ConfigError, PipelineError
from pipeline.io import atomic_write_text

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SMALL_ABMIL = {"hidden": 64, "attn_dim": 32, "dropout": 0.1}  # configs/mil/abmil-small.yaml
STAGES = (
    "preprocess",
    "stain",
    "pretrain",
    "extract",
    "train-mil",
    "evaluate",
    "heatmaps",
    "report",
)


@dataclass
class DemoConfig:
    """Build the demo cohort (if missing) and run the whole pipeline on it.

    Args:
        data: cohort folder (slides/, ground_truth/, labels.csv, cohort.json).
        cache: folder of the downloaded real texture sources.
        runs: folder of the stage outputs.
        n_slides: slides in the development cohort (half tumour, half normal).
        n_heldout: slides in the held-out cohort (other patients and sites, tissue from
            the textures' held-out regions only).
        seed: random seed; the cohort is deterministic for a seed.
        size_scale: physical extent of the slides (1.0: about 2-6 mm a side).
        workers: processes that generate and preprocess slides.
        make_data: only build the cohort, run no stage.
        pretrain_steps: steps of the tiny pretraining preset.
        folds: cross-validation folds of the slide tasks (grouped by patient).
        slide_seeds: most training seeds per slide task of the evaluation suite (its
            configs/benchmarks/demo.yaml has 3).
        bootstrap: bootstrap resamples of the confidence intervals (train-mil) and of the
            evaluation suite's intervals and paired tests.
        stop_after: run the stages up to this one (preprocess ... report).
        progress: show progress bars.
    """

    data: Path = Path("data/demo")
    cache: Path = Path("data/cache")
    runs: Path = Path("runs/demo")
    n_slides: int = 32
    n_heldout: int = 16
    seed: int = 0
    size_scale: float = 1.0
    workers: int = 2
    make_data: bool = False
    pretrain_steps: int = 300
    folds: int = 5
    slide_seeds: int = 3
    bootstrap: int = 1000
    stop_after: str = "report"
    progress: bool = True


class Demo:
    """The stages of the demo, sharing their paths."""

    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.runs = Path(cfg.runs)
        self.prep = self.runs / "preprocess"
        self.stain_dir = self.runs / "stain"
        self.pretrain_dir = self.runs / "pretrain"
        self.encoder = self.pretrain_dir / "encoder"
        self.encoders = {"pretrained": str(self.encoder), "random": f"random:{self.encoder}"}
        self.features = self.runs / "features"
        self.mil = self.runs / "mil"
        self.eval = self.runs / "eval"
        self.heatmaps = self.runs / "heatmaps"
        self.tumour_tiles = self.prep / "tumour_tiles.csv"
        self.summary: dict = {}

    def coords_list(self, cohort: str) -> Path:
        """The text file listing the coords files of one cohort's slides."""
        return self.prep / f"{cohort}.txt"

    # 2
    def preprocess(self) -> str:
        from pipeline.wsi.preprocess import PreprocessConfig, preprocess

        prep = PreprocessConfig(
            slides=str(self.cfg.data / "slides"), out=self.prep, workers=self.cfg.workers
        )
        rows = preprocess(prep, progress=self.cfg.progress)
        failed = [r for r in rows if r["status"] == "failed"]
        if failed:
            raise PipelineError(f"{len(failed)} slides failed, first: {failed[0]['error']}")
        tiles = sum(int(r["n_tiles"]) for r in rows)
        cohort_of = {r["slide_id"]: r.get("cohort", DEVELOPMENT) for r in self.records()}
        per_cohort = {}
        for cohort in COHORTS:
            ids = sorted(s for s, c in cohort_of.items() if c == cohort)
            files = [f"coords/{s}.h5" for s in ids if (self.prep / "coords" / f"{s}.h5").is_file()]
            atomic_write_text(self.coords_list(cohort), "".join(f"{f}\n" for f in files))
            per_cohort[cohort] = sum(int(r["n_tiles"]) for r in rows if r["slide_id"] in ids)
        # tumour (1) / other (0) tiles from the ground-truth masks: attention localization
        truth = tile_labels(self.prep / "coords", self.cfg.data, test="all")
        lines = [f"{r['slide_id']},{r['index']},{int(r['label'] == 'tumor')}" for r in truth]
        atomic_write_text(self.tumour_tiles, "slide_id,index,positive\n" + "\n".join(lines) + "\n")
        self.summary["preprocess"] = {
            "slides": len(rows),
            "tiles": tiles,
            "tiles_per_cohort": per_cohort,
            "mpp": prep.target_mpp,
            "tile_size": prep.tile_size,
        }
        split = ", ".join(f"{n} {c}" for c, n in per_cohort.items() if n)
        return (
            f"{tiles} tiles ({split}) of {prep.tile_size} px at {prep.target_mpp} mpp "
            f"from {len(rows)} slides"
        )

    def records(self) -> list[dict]:
        import json

        return json.loads((Path(self.cfg.data) / "cohort.json").read_text())["slides"]

    # 3
    def stain(self) -> str:
        from pipeline.stain.figures import stain_demo

        facts = stain_demo(self.coords_list(DEVELOPMENT), self.stain_dir)
        self.summary["stain"] = facts
        return (
            f"macenko fitted to {facts['reference']}; slide-ID probe on colour "
            f"{facts['before']:.2f} -> {facts['after']:.2f} after normalization"
        )

    # 4
    def pretrain(self) -> str:
        from pipeline.config import load_config
        from pipeline.ssl.pretrain import PretrainConfig
        from pipeline.ssl.train import train

        if (self.encoder / "model.safetensors").is_file():
            return f"reused {self.encoder}"
        cfg = load_config(
            PretrainConfig,
            CONFIGS / "pretrain" / "tiny-cpu.yaml",
            **{
                "out": self.pretrain_dir,
                "data.coords": self.coords_list(DEVELOPMENT),  # never a held-out tile
                "data.stain_augment": True,
                "trainer.max_steps": self.cfg.pretrain_steps,
                "trainer.progress_bar": self.cfg.progress,
                "ckpt_path": "last",
            },
        )
        train(cfg)
        return (
            f"{self.cfg.pretrain_steps} steps of the tiny preset on the development cohort's "
            f"tiles -> {self.encoder}"
        )

    # 5
    def extract(self) -> str:
        from pipeline.config import load_config
        from pipeline.extract import ExtractConfig
        from pipeline.extraction import extract

        done = []
        for name, spec in self.encoders.items():
            cfg = load_config(
                ExtractConfig,
                CONFIGS / "extract" / "tiny-cpu.yaml",
                coords=self.prep / "coords",
                encoder=spec,
                out=self.features / name,
                stain_norm=self.stain_dir / "stain.json",
                progress=self.cfg.progress,
            )
            rows = extract(cfg)
            failed = [r for r in rows if r["status"] == "failed"]
            if failed:
                raise PipelineError(
                    f"{name}: {len(failed)} slides failed, first: {failed[0]['error']}"
                )
            done.append(f"{name} ({len(rows)} slides)")
        return "features of " + ", ".join(done)

    # 6
    def train_mil(self) -> str:
        from pipeline.config import load_config
        from pipeline.mil.train import TrainMILConfig
        from pipeline.mil.training import train_cv

        labels = self.cfg.data / "labels.csv"  # the development cohort
        self.summary["mil"] = {}
        runs = [
            (name, "abmil-small.yaml", {"task": "classification", "tile_labels": self.tumour_tiles})
            for name in self.encoders
        ]
        runs.append(
            (
                "pretrained",
                "survival-cox.yaml",
                {"task": "survival", "val_share": 0.0, "model_args": SMALL_ABMIL},
            )
        )
        for name, preset, extra in runs:  # same labels and seed: the same patient splits
            run_name = name if extra["task"] == "classification" else "survival"
            cfg = load_config(
                TrainMILConfig,
                CONFIGS / "mil" / preset,
                features=self.features / name,
                labels=labels,
                out=self.mil / run_name,
                progress=self.cfg.progress,
                folds=self.cfg.folds,
                bootstrap=self.cfg.bootstrap,
                **extra,
            )
            metrics = train_cv(cfg)
            self.summary["mil"][run_name] = metrics["pooled"]
            if "localization" in metrics:
                self.summary["mil"][run_name]["localization"] = metrics["localization"]["auc"]
        auc = {n: self.summary["mil"][n]["auc"]["value"] for n in self.encoders}
        loc = {n: self.summary["mil"][n].get("localization", float("nan")) for n in self.encoders}
        c = self.summary["mil"]["survival"]["c_index"]["value"]
        return (
            f"ABMIL slide AUC: pretrained {auc['pretrained']:.3f}, random {auc['random']:.3f}; "
            f"attention localization AUC: pretrained {loc['pretrained']:.3f}, random "
            f"{loc['random']:.3f}; survival c-index {c:.3f}"
        )

    # 7
    def evaluate(self) -> str:
        import yaml

        from pipeline.config import load_config
        from pipeline.eval.evaluate import EvaluateConfig
        from pipeline.eval.suite import run_suite

        suite = (CONFIGS / "benchmarks" / "demo.yaml").read_text()
        suite = suite.replace("runs/demo", str(self.runs)).replace("data/demo", str(self.cfg.data))
        values = yaml.safe_load(suite)
        values["progress"] = self.cfg.progress
        values["bootstrap"] = self.cfg.bootstrap
        for task in values["tasks"]:
            if task.get("kind") == "slide":
                task["folds"] = self.cfg.folds
                task["seeds"] = list(task.get("seeds", [0]))[: max(1, self.cfg.slide_seeds)]
        resolved = self.runs / "eval-suite.yaml"
        resolved.write_text(yaml.safe_dump(values, sort_keys=False))
        results = run_suite(load_config(EvaluateConfig, resolved))
        failed = {n: t["error"] for n, t in results["tasks"].items() if t["status"] != "ok"}
        if failed:
            raise PipelineError("; ".join(f"task {n}: {e}" for n, e in failed.items()))
        self.summary["evaluate"] = summary = evaluation_summary(results, list(self.encoders))
        lines = [
            f"{title} ({where}): pretrained {a} vs random init {b}" + (p and f", p = {p}")
            for title, where, a, b, p in headline_rows(summary)
        ]
        return "\n      ".join(lines)

    # 8
    def heatmaps_(self) -> str:
        import csv

        from pipeline.mil.drawing import draw_heatmap
        from pipeline.mil.heatmap import HeatmapConfig

        with open(self.cfg.data / "labels.csv", newline="") as f:
            tumour = [r["slide_id"] for r in csv.DictReader(f) if r["label"] == "tumor"]
        drawn = []
        for slide in tumour[:4]:
            out = self.heatmaps / f"{slide}.png"  # redrawn: the MIL run may have changed
            draw_heatmap(HeatmapConfig(run=self.mil / "pretrained", slide=slide, out=out))
            drawn.append(slide)
        return f"attention heatmaps of {len(drawn)} tumour slides -> {self.heatmaps}"

    # 9
    def report(self) -> str:
        from pipeline.demo_report import write_report

        return f"report: {write_report(self)}"


# {summary key: (title, (task, column) cross-validated on development, (task, column) held-out)}
HEADLINES = {
    "tile_linear": (
        "tissue-type tiles, linear probe",
        ("tissue-tiles", "linear"),
        ("tissue-tiles-heldout", "linear"),
    ),
    "tile_knn": (
        "tissue-type tiles, kNN",
        ("tissue-tiles", "knn"),
        ("tissue-tiles-heldout", "knn"),
    ),
    "slide_auc": (
        "tumour slides, ABMIL AUC",
        ("tumour-slides", "abmil"),
        ("tumour-slides-heldout", "abmil"),
    ),
    "localization": (
        "attention localization AUC",
        ("tumour-slides", "abmil_localization"),
        ("tumour-slides-heldout", "abmil_localization"),
    ),
}
WHERE = {"development": "development CV", "held_out": "held-out"}


def evaluation_summary(results: dict, encoders: list[str]) -> dict:
    """``{figure: {development | held_out: {encoder: value, ..., p_value}}}``: each headline
    figure of the demo suite per encoder, with the paired bootstrap p-value of the first
    two encoders (pretrained vs random init)."""
    out: dict = {}
    for key, (_, *places) in HEADLINES.items():
        for where, (task, col) in zip(WHERE, places, strict=True):
            r = results["tasks"].get(task, {})
            scores = r.get("scores", {}).get(col)
            if r.get("status") != "ok" or not scores:
                continue
            entry = {e: scores[e]["value"] for e in encoders if e in scores}
            pair = [
                c
                for c in r.get("comparisons", {}).get(col, [])
                if {c["a"], c["b"]} == set(encoders[:2])
            ]
            if pair:
                sign = 1 if pair[0]["a"] == encoders[0] else -1
                entry["difference"] = sign * pair[0]["difference"]
                entry["p_value"] = pair[0]["p_value"]
            out.setdefault(key, {})[where] = entry
    return out


def headline_rows(summary: dict) -> list[list[str]]:
    """``[title, scored on, pretrained, random init, p]`` per figure of
    :func:`evaluation_summary`, development before held-out."""
    rows = []
    for key, (title, *_) in HEADLINES.items():
        for where, label in WHERE.items():
            got = summary.get(key, {}).get(where)
            if got:
                p = got.get("p_value")
                scores = [f"{got[e]:.3f}" for e in ("pretrained", "random")]
                rows.append([title, label, *scores, "" if p is None else f"{p:.3f}"])
    return rows


def run(cfg: DemoConfig) -> None:
    if cfg.stop_after not in STAGES:
        raise ConfigError(f"--stop_after '{cfg.stop_after}': one of {', '.join(STAGES)}")
    start = time.perf_counter()
    log.info("demo cohort: %s (%d slides, seed %d)", cfg.data, cfg.n_slides, cfg.seed)
    records = make_cohort(
        cfg.data,
        cfg.n_slides,
        cfg.seed,
        cfg.size_scale,
        cfg.workers,
        cfg.cache,
        progress=cfg.progress,
        n_heldout=cfg.n_heldout,
    )
    save_config(cfg, cfg.data)
    print(describe_cohort(records))
    print(f"[1/{len(STAGES) + 1}] cohort ready in {time.perf_counter() - start:.0f} s: {cfg.data}")
    if cfg.make_data:
        return
    demo = Demo(cfg)
    steps = {
        "preprocess": demo.preprocess,
        "stain": demo.stain,
        "pretrain": demo.pretrain,
        "extract": demo.extract,
        "train-mil": demo.train_mil,
        "evaluate": demo.evaluate,
        "heatmaps": demo.heatmaps_,
        "report": demo.report,
    }
    for i, name in enumerate(STAGES, start=2):
        stage_start = time.perf_counter()
        print(f"[{i}/{len(STAGES) + 1}] {name} ...", flush=True)
        try:
            text = steps[name]()
        except (PipelineError, ConfigError) as exc:
            raise PipelineError(
                f"demo stopped at stage '{name}': {exc}. Fix the cause and run "
                "`make demo` again: finished stages are reused."
            ) from exc
        print(f"[{i}/{len(STAGES) + 1}] {name}: {text} ({time.perf_counter() - stage_start:.0f} s)")
        if name == cfg.stop_after:
            break
    print(f"demo finished in {time.perf_counter() - start:.0f} s; open {demo.runs / 'report.html'}")
