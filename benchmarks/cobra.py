"""COBRA slide encoder on its planted task, at 3 seeds, with MoCo v3's predictor on and off
(the slowest check of the COBRA code: kept here, out of ``make test``).

The task (:mod:`pipeline.slide.cobra_planted`): 96 training slides seen by three synthetic
"foundation models" (``tanh`` of different random linear maps of shared 8-d latent tile
signals; slides differ by their sparse mixture of 16 tile types), 40 held-out slides, 400
probe slides labelled by their composition (``composition``: more of one tile type) or by
5-15% of tiles of an extra type (``tumour``). The encoder (width 32, one state-space block,
4 heads, 100 epochs of batches of 32, lr 1e-2, momentum 0.99, on the CPU) is scored by

- cross-model retrieval: top-1 of each held-out slide seen by one model among the 40 seen by
  another (cosine in the contrastive space), mean and worst over the 6 ordered pairs;
- transfer to an unseen fourth model: 5-fold cross-validated AUC of a linear head on that
  model's tiles weighted by the attention the encoder computes from a known model (mean
  over the three), against mean pooling of the same tiles, measured in the same run.

Printed: a markdown table per arm (mean and standard deviation over the seeds) and the
seconds of one run (training and scoring).

Usage: ``python benchmarks/cobra.py [--seeds 3] [--epochs 100]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.slide.cobra_planted import run_planted

ARMS = {
    "composition, no predictor (MoCo v2-style)": {"predictor": False},
    "composition, predictor (MoCo v3, as COBRA)": {"predictor": True},
    "tumour, no predictor": {"predictor": False, "task": "tumour"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()
    start = time.perf_counter()
    print(f"COBRA planted task, {args.seeds} seeds, {args.epochs} epochs\n")
    print(
        "| arm | retrieval top-1, mean of pairs | worst pair | AUC: mean pooling | "
        "AUC: COBRA attention | COBRA - mean pooling | s per run |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, kwargs in ARMS.items():
        runs = [run_planted(seed, epochs=args.epochs, **kwargs) for seed in range(args.seeds)]
        top1 = [r["retrieval_mean"] for r in runs]
        worst = [min(r["retrieval"].values()) for r in runs]
        pooled = [r["auc"]["mean pooling"] for r in runs]
        cobra = [np.mean([r["auc"][f"cobra <- {m}"] for m in "abc"]) for r in runs]
        gap = np.subtract(cobra, pooled)
        seconds = np.median([r["seconds"] for r in runs])

        def cell(values) -> str:
            return f"{np.mean(values):.3f} ({np.std(values):.3f})"

        print(
            f"| {name} | {cell(top1)} | {cell(worst)} | {cell(pooled)} | {cell(cobra)} | "
            f"{cell(gap)} | {seconds:.0f} |"
        )
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
