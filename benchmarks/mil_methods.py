"""MIL methods against their baselines on the planted tasks of their tests, at more seeds and
larger cohorts.

The three planted tasks of :mod:`pipeline.mil.planted`, each method against its baselines
with the settings of its test, on ``--seeds`` seeds (the tests run 3) and cohorts
``--scale`` times the tests' (every bag count, training and test):

- MHIM-MIL (``tests/mil/test_mhim.py``): the shortcut task, 60 training and 40 test bags of
  16 instances in 8-d, half positive, weak evidence in every positive bag (3 instances
  shifted by 2) and a strong shortcut instance in 70% of the training positives only.
  Plain ABMIL (12 epochs at lr 2e-3) against MHIM-ABMIL with the same settings and the
  plain run as its teacher. Figure: test AUC.
- SC-MIL (``tests/mil/test_supcon_training.py``): three classes at 10:3:1 among the
  training bags (100, 30, 10), 20 test bags per class, 3 of 16 instances shifted by 2
  along the class's axis. ABMIL with plain cross-entropy, with class-weighted
  cross-entropy, and SC-MIL (class-weighted cross-entropy term), all 40 epochs of batches
  of 16 at lr 5e-3. Figure: balanced accuracy on the balanced test set.
- PANTHER (``tests/slide/test_panther.py``): 100 bags per class of 120 tiles of a
  three-component Gaussian mixture in 4-d; the classes differ only in one component's
  variance (``variance``) or only in the proportions (``proportions``). PANTHER slide
  embeddings (3 prototypes from 3,000 tiles) against mean pooling, each with a linear head.
  Figure: 5-fold cross-validated balanced accuracy.

Printed, per task: a markdown table of each arm's figure (mean and standard deviation over
the seeds), the seeds where the method beats that arm (ties counted apart), the median
seconds of one run of the arm (training and scoring; PANTHER: prototypes, embedding and
cross-validation), then the peak resident memory of the process so far.

Usage: ``python benchmarks/mil_methods.py [--seeds 10] [--scale 2] [--only mhim,supcon,panther]``
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from pipeline.mil.planted import (
    IMBALANCED_ARMS,
    imbalanced_config,
    mixture_bags,
    shortcut_config,
    write_imbalanced_cohort,
    write_shortcut_cohort,
)
from pipeline.mil.training import train_cv
from pipeline.slide.head import cross_validate
from pipeline.slide.panther import fit_prototypes, mean_pool, panther_embed, sample_tiles

TASKS = ("mhim", "supcon", "panther")


def timed(fn, *args, **kw) -> tuple[float, float]:
    """``(fn(*args, **kw), seconds)``."""
    t0 = time.perf_counter()
    value = fn(*args, **kw)
    return value, time.perf_counter() - t0


def mhim(root: Path, seed: int, scale: int) -> dict[str, tuple[float, float]]:
    """Test AUC and seconds of plain ABMIL and of MHIM-ABMIL taught by it, on one cohort."""
    write_shortcut_cohort(root, seed, n_train=60 * scale, n_test=40 * scale)

    def run(out: Path, **kw) -> float:
        return train_cv(shortcut_config(root, out, seed, **kw))["pooled"]["auc"]["value"]

    plain = timed(run, root / "plain")
    return {
        "plain": plain,
        "mhim": timed(run, root / "mhim", strategy="mhim", teacher_init=root / "plain"),
    }


def supcon(root: Path, seed: int, scale: int) -> dict[str, tuple[float, float]]:
    """Balanced accuracy and seconds of each arm of :data:`IMBALANCED_ARMS` on one cohort."""
    n_train = tuple(n * scale for n in (100, 30, 10))
    write_imbalanced_cohort(root, seed, n_train=n_train, n_test=20 * scale)

    def run(arm: str) -> float:
        cfg = imbalanced_config(root, root / arm, seed, **IMBALANCED_ARMS[arm])
        return train_cv(cfg)["pooled"]["balanced_accuracy"]["value"]

    return {arm: timed(run, arm) for arm in IMBALANCED_ARMS}


def panther(kind: str, seed: int, scale: int) -> dict[str, tuple[float, float]]:
    """Cross-validated balanced accuracy and seconds of PANTHER and of mean pooling."""
    bags, labels = mixture_bags(seed, kind, n_per_class=100 * scale)

    def embedded() -> float:
        protos = fit_prototypes(sample_tiles(bags, 3000, seed), 3, seed=seed, backend="sklearn")
        cv = cross_validate(panther_embed(bags, protos), labels, folds=5, seed=seed)
        return cv["mean"]["balanced_accuracy"]

    def pooled() -> float:
        cv = cross_validate(mean_pool(bags), labels, folds=5, seed=seed)
        return cv["mean"]["balanced_accuracy"]

    return {"panther": timed(embedded), "mean": timed(pooled)}


def table(title: str, names: dict[str, str], method: str, runs: list[dict]) -> None:
    """Print one task's markdown table from ``runs`` (per seed: arm -> (figure, seconds))."""
    n = len(runs)
    print(f"{title}\n")
    print("| arm | mean (sd) | method > arm | median s per run |")
    print("| --- | --- | --- | --- |")
    best = [r[method][0] for r in runs]
    for arm, name in names.items():
        values = [r[arm][0] for r in runs]
        seconds = statistics.median(r[arm][1] for r in runs)
        if arm == method:
            wins = "-"
        else:
            won = sum(b > v for b, v in zip(best, values, strict=True))
            tied = sum(b == v for b, v in zip(best, values, strict=True))
            wins = f"{won}/{n} seeds" + (f" ({tied} tied)" if tied else "")
        print(f"| {name} | {np.mean(values):.3f} ({np.std(values):.3f}) | {wins} | {seconds:.2f} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory so far {peak:.0f} MiB\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--scale", type=int, default=2, help="bag counts x the tests'")
    parser.add_argument("--only", default=",".join(TASKS), help="comma-separated tasks")
    args = parser.parse_args()
    tasks = [t for t in args.only.split(",") if t]
    unknown = set(tasks) - set(TASKS)
    if unknown:
        parser.error(f"unknown tasks {sorted(unknown)}; known: {', '.join(TASKS)}")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    seeds, k = range(args.seeds), args.scale
    print(f"planted tasks, {args.seeds} seeds (0-{args.seeds - 1}), cohorts {k} x the tests'\n")
    with tempfile.TemporaryDirectory() as tmp:
        if "mhim" in tasks:
            runs = [mhim(Path(tmp) / f"mhim{s}", s, k) for s in seeds]
            table(
                f"MHIM-MIL, shortcut task ({60 * k} training, {40 * k} test bags): test AUC",
                {"plain": "plain ABMIL", "mhim": "MHIM-ABMIL (teacher: the plain run)"},
                "mhim",
                runs,
            )
        if "supcon" in tasks:
            runs = [supcon(Path(tmp) / f"supcon{s}", s, k) for s in seeds]
            table(
                f"SC-MIL, 10:3:1 task ({140 * k} training, {60 * k} test bags): balanced accuracy",
                {
                    "plain": "cross-entropy",
                    "weighted": "class-weighted cross-entropy",
                    "supcon": "SC-MIL (class-weighted cross-entropy term)",
                },
                "supcon",
                runs,
            )
    if "panther" in tasks:
        for kind in ("variance", "proportions"):
            runs = [panther(kind, s, k) for s in seeds]
            table(
                f"PANTHER, {kind} task ({200 * k} bags, 5 folds): balanced accuracy",
                {"mean": "mean pooling + linear", "panther": "PANTHER + linear"},
                "panther",
                runs,
            )
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
