"""``cpath evaluate``: run a benchmark suite over one or more encoders.

    cpath evaluate --config configs/benchmarks/demo.yaml
    cpath evaluate --config configs/benchmarks/demo.yaml --encoders pretrained,random
    cpath evaluate --config my-suite.yaml --encoders mine=runs/pretrain/encoder,uni=timm:vit_large_patch16_224

A suite (YAML) names its encoders (``encoder_specs``: name -> anything ``cpath extract``
takes as ``--encoder``) and its tasks. A task is ``kind: tile`` (labelled tiles; linear
probe, kNN and few-shot on frozen features, plus robustness probes) or ``kind: slide``
(per-encoder feature folders + a labels CSV; MIL cross-validation over seeds, for
classification or survival). See ``configs/benchmarks/`` and the README. Tile folds
keep a patient's slides on one side where the data names patients (``case_id``).

Outputs under ``out``: ``results.json`` (every metric with its bootstrap 95% CI, paired
comparisons between encoders, few-shot curves, robustness), ``leaderboard.csv``
(encoders x task columns, with the mean rank), ``report.md`` and ``report.html`` with
their ``figures/``, the feature cache and the slide-task runs, and ``config.yaml``.
A task that fails (missing data, one class, encoders with different tile sets) is
reported with its error and the others still run; the command then exits with 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EvaluateConfig:
    """Evaluate encoders on a suite of tile- and slide-level tasks.

    Args:
        encoder_specs: encoders of the suite, name -> spec (exported folder, timm:<arch>,
            hf-hub:<repo>, random:<exported folder>, or a zoo model KEY or KEY:MODE). A
            suffix @SIZE on any but a zoo spec evaluates the encoder at SIZE px inputs without
            training, its ViT position embeddings resampled bicubically to the new patch grid
            (class token position unchanged): `mine@392: runs/pretrain/encoder@392`, the
            baseline of a high-resolution post-training (Midnight, Karasikov et al., 2025).
        weights_map: YAML file of `key: path` lines giving zoo encoders their weights
            (default: the file named by $CPATH_WEIGHTS).
        encoders: which to evaluate: names of encoder_specs, zoo keys, or name=spec to
            add one (comma-separated; default: all of encoder_specs).
        tasks: the suite's tasks (see the module docstring and configs/benchmarks/).
        out: output folder.
        folds: grouped cross-validation folds of tile tasks without a fixed split.
        shots: few-shot examples per class.
        episodes: few-shot episodes per shot count.
        knn_k: neighbours of the kNN protocol.
        knn_temperature: temperature of the kNN votes.
        robustness: run the robustness probes on tile tasks: site predicted on held-out
            slides, the PathoROB robustness index and the stain-shift drop.
        robustness_k: neighbours of the PathoROB robustness index (Kömen et al., 2025;
            11 as PathoROB uses for Camelyon).
        bootstrap: bootstrap resamples for confidence intervals and paired tests.
        batch_size: tiles per forward pass when embedding.
        workers: DataLoader workers reading tiles.
        device: auto, cpu or cuda.
        seed: seed of folds, sweeps and episodes.
        progress: show progress bars.
    """

    encoder_specs: dict[str, str] = field(default_factory=dict)
    encoders: str | list[str] | None = None
    weights_map: Path | None = None
    tasks: list[dict[str, Any]] = field(default_factory=list)
    out: Path = Path("runs/eval")
    folds: int = 5
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    episodes: int = 100
    knn_k: int = 20
    knn_temperature: float = 0.07
    robustness: bool = True
    robustness_k: int = 11
    bootstrap: int = 1000
    batch_size: int = 64
    workers: int = 0
    device: str = "auto"
    seed: int = 0
    progress: bool = True


def selected_encoders(cfg: EvaluateConfig) -> dict[str, str]:
    """``{name: spec}`` of the encoders to evaluate (see ``EvaluateConfig.encoders``)."""
    from pipeline.encoders.zoo import spec as zoo_spec
    from pipeline.errors import ConfigError

    items = cfg.encoders
    if items is None:
        chosen = dict(cfg.encoder_specs)
    else:
        if isinstance(items, str):
            items = [i for i in items.split(",") if i.strip()]
        chosen = {}
        for item in items:
            name, sep, spec = item.strip().partition("=")
            if sep:
                chosen[name] = spec
            elif name in cfg.encoder_specs:
                chosen[name] = cfg.encoder_specs[name]
            elif zoo_spec(name) is not None:  # a public model by its zoo key
                chosen[name] = name
            else:
                known = ", ".join(cfg.encoder_specs) or "none in this suite"
                raise ConfigError(
                    f"--encoders: unknown encoder '{name}' (known: {known}); "
                    "give name=spec to add one"
                )
    if not chosen:
        raise ConfigError("no encoders: give encoder_specs in the suite or --encoders name=spec")
    return chosen


def run(cfg: EvaluateConfig) -> int:
    from pipeline.eval.suite import run_suite

    results = run_suite(cfg)
    failed = [name for name, t in results["tasks"].items() if t["status"] != "ok"]
    print(
        f"evaluate: {len(results['tasks']) - len(failed)} of {len(results['tasks'])} tasks done; "
        f"leaderboard {Path(cfg.out) / 'leaderboard.csv'}, report {Path(cfg.out) / 'report.html'}"
    )
    for name in failed:
        print(f"  task {name} failed: {results['tasks'][name]['error']}")
    return 1 if failed else 0
