"""Pretrained-aggregator transfer on the planted task of ``tests/mil/test_transfer.py``, at
more seeds, shots and test bags.

A 40-class source whose classes are pairs of 8 latent directions (``--source-bags`` bags
per class, 3 of 24 instances shifted by 4 along the class's direction) and a 4-class
target whose classes are single latents (one instance of 24 shifted by 4), from
:mod:`pipeline.mil.planted`. ABMIL (hidden 32, attention 16) is trained on the target
from scratch, from the related source's model (``--init_from``) and from an unrelated
source's (8 latents orthogonal to the target's), on ``--shots`` slides per class of 32,
with the test's optimisation (sources: 15 epochs at lr 5e-3; targets: 20 epochs at lr 1e-2,
the transferred body at 0.1 x lr). Printed: macro AUC
on ``--test-bags`` test bags per class (mean and standard deviation over ``--seeds``
target draws), the seeds where the related source beats scratch, the median time of a
target run per arm, and the peak resident memory.

Usage: ``python benchmarks/mil_transfer.py [--seeds 10] [--shots 2,4,8,16,32]``
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

from pipeline.mil.planted import train_config, transfer_directions, write_cohort
from pipeline.mil.training import train_cv

ARMS = ("scratch", "related", "unrelated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--shots", default="2,4,8,16,32")
    parser.add_argument("--test-bags", type=int, default=32)
    parser.add_argument("--source-bags", type=int, default=12)
    parser.add_argument("--dim", type=int, default=32)
    args = parser.parse_args()
    shots = [int(s) for s in args.shots.split(",")]
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        related, unrelated, target = transfer_directions(args.dim)
        sources = {}
        for name, directions in (("related", related), ("unrelated", unrelated)):
            write_cohort(root / name, directions, args.source_bags, 2, shift=4.0, seed=1)
            train_cv(train_config(root / name, root / name / "run", 0, lr=5e-3, epochs=15))
            sources[name] = root / name / "run"
        auc: dict[tuple[str, int], list[float]] = {}
        seconds: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for seed in range(args.seeds):
            cohort = write_cohort(
                root / f"target{seed}",
                target,
                max(shots),
                args.test_bags,
                4.0,
                100 + seed,
                evidence=1,
                prefix="t",
            )
            for k in shots:
                for arm in ARMS:
                    cfg = train_config(
                        cohort, cohort / f"{arm}{k}", seed, shots=k, init_from=sources.get(arm)
                    )
                    t0 = time.perf_counter()
                    value = train_cv(cfg)["pooled"]["auc"]["value"]
                    seconds[arm].append(time.perf_counter() - t0)
                    auc.setdefault((arm, k), []).append(value)
    print(
        f"planted transfer, dim {args.dim}, {args.seeds} target seeds, "
        f"{args.test_bags} test bags per class; macro AUC mean (sd)\n"
    )
    print("| shots | scratch | related source | unrelated source | related > scratch |")
    print("| --- | --- | --- | --- | --- |")
    for k in shots:
        cells = [f"{np.mean(auc[(arm, k)]):.3f} ({np.std(auc[(arm, k)]):.3f})" for arm in ARMS]
        wins = sum(r > s for r, s in zip(auc[("related", k)], auc[("scratch", k)], strict=True))
        print(f"| {k} | {' | '.join(cells)} | {wins}/{args.seeds} seeds |")
    times = ", ".join(f"{arm} {statistics.median(seconds[arm]):.2f} s" for arm in ARMS)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nmedian time of a target run: {times}; peak resident memory {peak:.0f} MiB")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
