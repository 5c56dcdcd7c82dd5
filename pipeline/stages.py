"""The sub-commands of ``cpath``: name -> (config dataclass, stage function), imported lazily.

Adding a stage is one line here plus its module with a ``*Config`` dataclass and a
``run(cfg)`` function. Config modules import nothing heavy at module level, so
``cpath --help`` stays fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    module: str
    config: str
    run: str = "run"

    def load(self) -> tuple[type, Any]:
        module = importlib.import_module(self.module)
        return getattr(module, self.config), getattr(module, self.run)


STAGES = {
    s.name: s
    for s in (
        Stage(
            "preprocess",
            "tissue detection and tiling at a physical resolution",
            "pipeline.wsi.preprocess",
            "PreprocessConfig",
        ),
        Stage("stain", "fit and apply stain normalization", "pipeline.stain.cli", "StainConfig"),
        Stage(
            "pretrain",
            "self-supervised pretraining (DINOv2-style)",
            "pipeline.ssl.pretrain",
            "PretrainConfig",
        ),
        Stage(
            "extract",
            "frozen encoder -> per-slide feature files",
            "pipeline.extract",
            "ExtractConfig",
        ),
        Stage(
            "curate",
            "cluster-balanced sampling weights of pretraining tiles (hierarchical k-means)",
            "pipeline.curation.curate",
            "CurateConfig",
        ),
        Stage(
            "train-mil",
            "slide-level MIL training and cross-validation",
            "pipeline.mil.train",
            "TrainMILConfig",
        ),
        Stage(
            "slide-embed",
            "unsupervised slide embeddings (PANTHER, COBRA) and a linear head on them",
            "pipeline.slide.embed",
            "SlideEmbedConfig",
        ),
        Stage(
            "train-slide-encoder",
            "self-supervised COBRA slide encoder from several models' tile features",
            "pipeline.slide.cobra_train",
            "TrainSlideEncoderConfig",
        ),
        Stage(
            "heatmap",
            "MIL attention over a slide thumbnail, top tiles",
            "pipeline.mil.heatmap",
            "HeatmapConfig",
        ),
        Stage(
            "evaluate", "encoder benchmarks and reports", "pipeline.eval.evaluate", "EvaluateConfig"
        ),
        Stage(
            "benchmark-data",
            "lay out a downloaded public tile benchmark for evaluate",
            "pipeline.eval.benchmark_data",
            "BenchmarkDataConfig",
        ),
        Stage("demo", "the whole pipeline on the demo cohort", "pipeline.demo", "DemoConfig"),
        Stage("info", "versions, devices, OpenSlide and demo data", "pipeline.info", "InfoConfig"),
        Stage(
            "encoders",
            "the zoo of public pathology foundation models",
            "pipeline.encoder_list",
            "EncodersConfig",
        ),
    )
}
