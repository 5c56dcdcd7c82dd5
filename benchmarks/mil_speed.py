"""MIL training speed: epoch time of each aggregator against a CLAM-style per-bag loop.

A synthetic task generated here: ``--bags`` bags of 500-5000 instances x 1024 dims
(float32 h5 feature files), half of them positive with a signal planted along one
direction in 5-30% of their instances; a fixed stratified split of 70% train / 30%
validation. One run measures, with the same model sizes (CLAM's ABMIL: 1024 -> 512,
attention 256) and optimiser:

- reference: the loop of the CLAM code base, one bag per step, each bag's features read
  from its h5 file every epoch, fp32;
- ours: ``cpath train-mil``'s Lightning module over the in-memory :class:`BagStore`,
  fp32 and bf16 autocast, whole bags, and with ``--max-instances`` random instances per
  training bag (evaluation always on whole bags), one bag per step and four.

An epoch is training plus validation. Printed: median epoch time, validation AUC after
the last epoch, and the ratio of the reference epoch time to each.

Usage: ``python benchmarks/mil_speed.py [--epochs 5] [--bags 40] [--models abmil,...]``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from pipeline.features import FeatureWriter
from pipeline.mil.bags import BaseBagStore, open_bag_store
from pipeline.mil.base import make_mil
from pipeline.mil.train import TrainMILConfig
from pipeline.mil.training import MILModule, Targets, bag_loader, mil_trainer, predict_bags

DIM = 1024
SIZES = {
    "abmil": {"hidden": 512, "attn_dim": 256},
    "clam_sb": {"hidden": 512, "attn_dim": 256},
    "clam_mb": {"hidden": 512, "attn_dim": 256},
    "transmil": {"hidden": 512},
    "dsmil": {},
    "mean": {"hidden": 512},
    "max": {"hidden": 512},
}


def make_bags(folder: Path, n_bags: int, seed: int = 0) -> list[dict]:
    """Write the synthetic bags; returns label rows with a ``split`` of train or val."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=DIM).astype(np.float32)
    direction /= np.linalg.norm(direction)
    rows = []
    for i in range(n_bags):
        n = int(rng.integers(500, 5001))
        x = rng.standard_normal((n, DIM), dtype=np.float32)
        positive = i % 2 == 1
        if positive:
            k = max(1, int(n * rng.uniform(0.05, 0.30)))
            x[rng.choice(n, k, replace=False)] += 1.5 * direction
        writer = FeatureWriter(folder / f"bag{i:03d}.h5", n, DIM, np.zeros((n, 2)), {}, "float32")
        writer.write(x, 0)
        writer.close()
        split = "val" if i % 10 in (0, 3, 6) else "train"
        rows.append(
            {
                "slide_id": f"bag{i:03d}",
                "case_id": f"bag{i:03d}",
                "label": "pos" if positive else "neg",
                "split": split,
            }
        )
    return rows


def reference(folder: Path, rows: list[dict], epochs: int, seed: int = 0) -> tuple[list, float]:
    """CLAM-style training: batch of one bag, features read from disk every epoch."""
    torch.manual_seed(seed)
    model = make_mil("abmil", DIM, 2, **SIZES["abmil"])
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, weight_decay=1e-5)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]

    def load(r):
        with h5py.File(folder / f"{r['slide_id']}.h5", "r") as f:
            x = torch.from_numpy(f["features"][:])[None]  # 1 x N x D
        return (
            x,
            torch.ones(x.shape[:2], dtype=torch.bool),
            torch.tensor([r["label"] == "pos"]).long(),
        )

    times, auc = [], float("nan")
    for _ in range(epochs):
        start = time.perf_counter()
        model.train()
        for i in torch.randperm(len(train)).tolist():
            x, mask, y = load(train[i])
            loss = F.cross_entropy(model(x, mask)["logits"], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        probs = []
        with torch.no_grad():
            for r in val:
                x, mask, _ = load(r)
                probs.append(torch.softmax(model(x, mask)["logits"], -1)[0, 1].item())
        times.append(time.perf_counter() - start)
        auc = roc_auc_score([r["label"] == "pos" for r in val], probs)
    return times, auc


class EpochTimer(L.Callback):
    def __init__(self):
        self.times = []

    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):  # after this epoch's validation
        self.times.append(time.perf_counter() - self.start)


def ours(
    store: BaseBagStore,
    rows: list[dict],
    model: str,
    epochs: int,
    precision: str,
    max_instances: int | None,
    batch_size: int = 1,
    seed: int = 0,
) -> tuple[list, float]:
    """The train-mil module and loaders, one fold with the benchmark's split."""
    cfg = TrainMILConfig(
        model=model,
        model_args=SIZES[model],
        epochs=epochs,
        lr=2e-4,
        max_instances=max_instances,
        precision=precision,
        progress=False,
        balanced=False,
        device="cpu",
        batch_size=batch_size,
        standardize=False,
    )
    L.seed_everything(seed, verbose=False)
    generator = torch.Generator().manual_seed(seed)
    targets = Targets(rows, "classification", ["neg", "pos"], cfg.time_bins)
    train = [r["slide_id"] for r in rows if r["split"] == "train"]
    val = [r["slide_id"] for r in rows if r["split"] == "val"]
    run = replace(cfg, model=model, task="classification", epochs=epochs, standardize=False)
    module = MILModule.for_config(run, store.dim, 2)
    timer = EpochTimer()
    trainer = mil_trainer(cfg, logger=False, callbacks=[timer], enable_checkpointing=False)
    trainer.fit(
        module,
        bag_loader(train, store, targets, cfg, True, generator),
        bag_loader(val, store, targets, cfg, False, generator),
    )
    probs = predict_bags(module, val, store, targets, cfg)
    auc = roc_auc_score([targets.by_id[s]["label"] == "pos" for s in val], [p[1] for p in probs])
    return timer.times, auc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--bags", type=int, default=40)
    parser.add_argument("--max-instances", type=int, default=512)
    parser.add_argument("--models", default=",".join(SIZES))
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-run banners
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = make_bags(folder, args.bags)
        instances = sum(
            h5py.File(folder / f"{r['slide_id']}.h5")["features"].shape[0] for r in rows
        )
        print(
            f"{args.bags} bags, {instances} instances x {DIM}, {torch.get_num_threads()} CPU "
            f"threads, {args.epochs} epochs; epoch = train + validation, median"
        )
        ref_times, ref_auc = reference(folder, rows, args.epochs)
        ref = statistics.median(ref_times)
        print(f"  {'reference (CLAM-style loop)':44s} {ref:7.2f} s/epoch  AUC {ref_auc:.3f}")
        start = time.perf_counter()
        store = open_bag_store(folder, [r["slide_id"] for r in rows], "memory")
        print(f"  bag store loaded once in {time.perf_counter() - start:.2f} s")
        runs = [("abmil", "32-true", None, 1), ("abmil", "bf16-mixed", None, 1)]
        runs += [(m, "bf16-mixed", args.max_instances, 1) for m in args.models.split(",")]
        runs += [("abmil", "bf16-mixed", args.max_instances, 4)]
        for model, precision, cap, batch in runs:
            times, auc = ours(store, rows, model, args.epochs, precision, cap, batch)
            t = statistics.median(times)
            name = f"{model}, {precision}, " + (f"{cap} inst./train bag" if cap else "whole bags")
            name += f", {batch} bags/step" if batch > 1 else ""
            print(f"  {name:44s} {t:7.2f} s/epoch  AUC {auc:.3f}  ratio {ref / t:5.1f}x")


if __name__ == "__main__":
    main()
