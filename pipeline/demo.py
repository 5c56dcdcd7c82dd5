"""``cpath demo``: the whole pipeline on the demo cohort built from real H&E texture.

Stages, each reusing what an earlier run finished (so a rerun only does what is missing):

1. cohort: build the demo slides, labels and ground-truth masks (if missing);
2. preprocess: tissue detection and tiling at 0.5 mpp, QC thumbnails;
3. stain: fit Macenko to a reference tile, before/after figure and slide-clustering report;
4. pretrain: the tiny DINOv2 preset with stain augmentation, exported encoder;
5. extract: stain-normalized features with that encoder and with the same architecture
   at random init;
6. train-mil: ABMIL (``configs/mil/abmil-small.yaml``), 5 folds grouped by patient, on
   both feature sets; one survival run (Cox);
7. evaluate: ``configs/benchmarks/demo.yaml`` for both encoders;
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
        n_slides: slides in the cohort (half tumour, half normal).
        seed: random seed; the cohort is deterministic for a seed.
        size_scale: physical extent of the slides (1.0: about 2-6 mm a side).
        workers: processes that generate and preprocess slides.
        make_data: only build the cohort, run no stage.
        pretrain_steps: steps of the tiny pretraining preset.
        folds: cross-validation folds of the slide tasks (grouped by patient).
        stop_after: run the stages up to this one (preprocess ... report).
        progress: show progress bars.
    """

    data: Path = Path("data/demo")
    cache: Path = Path("data/cache")
    runs: Path = Path("runs/demo")
    n_slides: int = 32
    seed: int = 0
    size_scale: float = 1.0
    workers: int = 2
    make_data: bool = False
    pretrain_steps: int = 300
    folds: int = 5
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
        self.summary: dict = {}

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
        self.summary["preprocess"] = {
            "slides": len(rows),
            "tiles": tiles,
            "mpp": prep.target_mpp,
            "tile_size": prep.tile_size,
        }
        return (
            f"{tiles} tiles of {prep.tile_size} px at {prep.target_mpp} mpp from {len(rows)} slides"
        )

    # 3
    def stain(self) -> str:
        from pipeline.stain.figures import stain_demo

        facts = stain_demo(self.prep / "coords", self.stain_dir)
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
                "data.coords": self.prep / "coords",
                "data.stain_augment": True,
                "trainer.max_steps": self.cfg.pretrain_steps,
                "trainer.progress_bar": self.cfg.progress,
                "ckpt_path": "last",
            },
        )
        train(cfg)
        return f"{self.cfg.pretrain_steps} steps of the tiny preset -> {self.encoder}"

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

        labels = self.cfg.data / "labels.csv"
        self.summary["mil"] = {}
        # tumour / normal tiles from the ground-truth masks: the attention localization AUC
        truth = self.mil / "tile_labels.csv"
        rows = tile_labels(self.prep / "coords", self.cfg.data)
        lines = [f"{r['slide_id']},{r['index']},{int(r['label'] == 'tumor')}" for r in rows]
        atomic_write_text(truth, "slide_id,index,positive\n" + "\n".join(lines) + "\n")
        runs = [
            (name, "abmil-small.yaml", {"task": "classification", "tile_labels": truth})
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
        for task in values["tasks"]:
            if task.get("kind") == "slide":
                task["folds"] = self.cfg.folds
        resolved = self.runs / "eval-suite.yaml"
        resolved.write_text(yaml.safe_dump(values, sort_keys=False))
        results = run_suite(load_config(EvaluateConfig, resolved))
        failed = {n: t["error"] for n, t in results["tasks"].items() if t["status"] != "ok"}
        if failed:
            raise PipelineError("; ".join(f"task {n}: {e}" for n, e in failed.items()))
        tiles = results["tasks"]["tumour-tiles"]["scores"]["linear"]
        slides = results["tasks"]["tumour-slides"]["scores"]["abmil"]
        self.summary["evaluate"] = {
            "tile_linear": {e: tiles[e]["value"] for e in self.encoders},
            "slide_auc": {e: slides[e]["value"] for e in self.encoders},
        }
        s = self.summary["evaluate"]
        lines = []
        for key, what in (("tile_linear", "tile linear probe"), ("slide_auc", "slide AUC (ABMIL)")):
            a, b = s[key]["pretrained"], s[key]["random"]
            verdict = "pretrained ahead" if a > b else "pretrained NOT ahead"
            lines.append(f"{what}: pretrained {a:.3f} vs random init {b:.3f} ({verdict})")
        return "; ".join(lines)

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


def run(cfg: DemoConfig) -> None:
    if cfg.stop_after not in STAGES:
        raise ConfigError(f"--stop_after '{cfg.stop_after}': one of {', '.join(STAGES)}")
    start = time.perf_counter()
    log.info("demo cohort: %s (%d slides, seed %d)", cfg.data, cfg.n_slides, cfg.seed)
    records = make_cohort(cfg.data, cfg.n_slides, cfg.seed, cfg.size_scale, cfg.workers, cfg.cache)
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
