"""MIL features beyond memory: peak memory and epoch time of the disk bag store, against the
in-memory one.

A synthetic cohort written here (and reused when the folder holds it already, same
shapes): ``--slides`` feature files of ``--tiles`` x 1024 float16 features (400 x 10,000:
8.2 GB of float16 in 8.5 GB of files, 16.4 GB as the in-memory store's float32), half of
them positive with a signal planted along one direction in 5-30% of their instances; a
fixed split of 70% train / 30% validation. ABMIL with the project's defaults, trained by
``cpath train-mil``'s Lightning module, loaders and trainer (fp32 on a CPU, 4096 random
instances per training bag, whole validation bags, class-balanced sampling, features
standardized with the statistics of the training bags, read one bag at a time).

Each measurement runs in a fresh process; its peak resident memory (``ru_maxrss``)
includes Python and torch (their share, measured after the imports, is printed too):

- full set: the disk store over all slides, for ``--epochs`` epochs, the files first
  dropped from the page cache (``posix_fadvise``), so the statistics and the first
  validation read from the disk;
- subset: the first ``--subset`` slides, ``--rounds`` runs of each store alternated
  (memory, disk, disk, memory, memory, disk) on a warm page cache, then the disk store
  once more with the files dropped from the page cache first. Ratio: disk / memory epoch
  time (an epoch is training plus validation), of the best epochs and of the medians,
  within this run (other work on the machine only adds time: the best epoch is the
  steadier figure); and the batches alone, the stores taking turns bag by bag.

Usage: ``python benchmarks/mil_scale.py [--slides 400] [--tiles 10000] [--subset 40]
[--epochs 2] [--rounds 3] [--folder DIR] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

DIM = 1024


def cohort_rows(n_slides: int) -> list[dict]:
    """Label rows of the first ``n_slides`` slides, with a ``split`` of train or val."""
    return [
        {
            "slide_id": f"slide{i:04d}",
            "case_id": f"slide{i:04d}",
            "label": "pos" if i % 2 else "neg",
            "split": "val" if i % 10 in (0, 3, 6) else "train",
        }
        for i in range(n_slides)
    ]


def _complete(path: Path, tiles: int) -> bool:
    try:
        with h5py.File(path, "r") as f:
            ds = f["features"]
            return ds.shape == (tiles, DIM) and ds.dtype == np.float16 and f.attrs.get("complete")
    except (OSError, KeyError):
        return False


def make_cohort(folder: Path, n_slides: int, tiles: int) -> tuple[int, float]:
    """Write the slides not yet in ``folder`` (a slide's values depend on its index only);
    returns how many were written and the seconds it took."""
    from pipeline.features import FeatureWriter

    folder.mkdir(parents=True, exist_ok=True)
    direction = np.random.default_rng(12345).normal(size=DIM).astype(np.float32)
    direction /= np.linalg.norm(direction)
    written, start = 0, time.perf_counter()
    for i, r in enumerate(cohort_rows(n_slides)):
        path = folder / f"{r['slide_id']}.h5"
        if _complete(path, tiles):
            continue
        rng = np.random.default_rng(i)
        x = rng.standard_normal((tiles, DIM), dtype=np.float32)  # tiles x D
        if r["label"] == "pos":
            k = max(1, int(tiles * rng.uniform(0.05, 0.30)))
            x[rng.choice(tiles, k, replace=False)] += 1.5 * direction
        coords = np.stack([np.arange(tiles) % 100, np.arange(tiles) // 100], 1) * 256
        writer = FeatureWriter(path, tiles, DIM, coords, {}, "float16")
        writer.write(x.astype(np.float16), 0)
        writer.close()
        written += 1
    return written, time.perf_counter() - start


def drop_from_page_cache(paths: list[Path]) -> None:
    """Ask the kernel to drop the files' cached pages, so the next reads go to the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def page_cache_gb(paths: list[Path]) -> float | None:
    """GB of the files held in the page cache now (``fincore``; None without it)."""
    if not shutil.which("fincore"):
        return None
    done = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
        capture_output=True,
        text=True,
    )
    return sum(int(v) for v in done.stdout.split()) / 1e9 if done.returncode == 0 else None


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(spec: dict) -> dict:
    """One training run in this process (see the module docstring); its figures."""
    import lightning as L
    import torch

    from pipeline.mil.bags import DiskBagStore, open_bag_store
    from pipeline.mil.train import TrainMILConfig
    from pipeline.mil.training import MILModule, Targets, bag_loader, mil_trainer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.mil_speed import EpochTimer

    baseline = peak_rss_mib()

    folder = Path(spec["folder"])
    rows = cohort_rows(spec["slides"])
    ids = [r["slide_id"] for r in rows]
    if spec["cold"]:
        drop_from_page_cache([folder / f"{s}.h5" for s in ids])
    start = time.perf_counter()
    store = open_bag_store(folder, ids, spec["store"])
    opened = time.perf_counter() - start
    cfg = TrainMILConfig(model="abmil", epochs=spec["epochs"], progress=False, device="cpu")
    L.seed_everything(cfg.seed, verbose=False)
    generator = torch.Generator().manual_seed(cfg.seed)
    targets = Targets(rows, "classification", ["neg", "pos"], cfg.time_bins)
    train = [r["slide_id"] for r in rows if r["split"] == "train"]
    val = [r["slide_id"] for r in rows if r["split"] == "val"]
    module = MILModule.for_config(cfg, store.dim, 2)  # abmil, classification
    start = time.perf_counter()
    module.feature_mean, module.feature_std = store.statistics(train)
    stats = time.perf_counter() - start
    timer = EpochTimer()
    trainer = mil_trainer(cfg, logger=False, callbacks=[timer], enable_checkpointing=False)
    trainer.fit(
        module,
        bag_loader(train, store, targets, cfg, True, generator),
        bag_loader(val, store, targets, cfg, False, generator),
    )
    disk = isinstance(store, DiskBagStore)
    return {
        "store": "disk" if disk else "memory",
        "peak_rss_mib": peak_rss_mib(),
        "baseline_mib": baseline,
        "open_s": opened,
        "stats_s": stats,
        "epochs_s": timer.times,
        "val_loss": float(trainer.callback_metrics["val_loss"]),
        "reads": store.reads if disk else None,
        "hits": store.hits if disk else None,
        "peak_cached_mib": store.peak_cached_bytes / 2**20 if disk else None,
    }


def data_path(spec: dict) -> dict:
    """Milliseconds per bag of the batches of both stores (a training batch of 4096 random
    instances, a whole bag), the stores taking turns bag by bag (median of 2 passes)."""
    import torch

    from pipeline.mil.bags import collate, open_bag_store

    ids = [r["slide_id"] for r in cohort_rows(spec["slides"])]
    stores = {k: open_bag_store(spec["folder"], ids, k) for k in ("memory", "disk")}
    generators = {k: torch.Generator().manual_seed(0) for k in stores}
    times = {(k, what): [] for k in stores for what in ("train", "whole")}
    for _ in range(2):
        for slide_id in ids:
            for k, store in stores.items():
                start = time.perf_counter()
                x, _ = collate(store, [slide_id], 4096, generators[k])  # 1 x 4096 x D
                float(x.sum())
                times[k, "train"].append(time.perf_counter() - start)
                start = time.perf_counter()
                x, _ = collate(store, [slide_id])  # 1 x N x D
                float(x.sum())
                times[k, "whole"].append(time.perf_counter() - start)
    return {f"{k}_{what}": 1e3 * statistics.median(t) for (k, what), t in times.items()}


def run_measure(**spec) -> dict:
    """:func:`measure` in a fresh process (so stores do not share a peak)."""
    done = subprocess.run(
        [sys.executable, __file__, "--measure", json.dumps(spec)], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"measurement {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe(r: dict, cold: bool) -> str:
    name = r["store"] + (", cold page cache" if cold else "")
    epochs = ", ".join(f"{t:.1f}" for t in r["epochs_s"])
    text = (
        f"    {name:24s} peak RSS {r['peak_rss_mib']:6.0f} MiB  "
        f"{'open' if r['store'] == 'disk' else 'load'} {r['open_s']:5.2f} s  "
        f"statistics {r['stats_s']:5.1f} s  epochs {epochs} s  val loss {r['val_loss']:.5f}"
    )
    if r["store"] == "disk":
        text += f"  ({r['reads']} bag reads, {r['hits']} cache hits, cache peak {r['peak_cached_mib']:.0f} MiB)"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=400)
    parser.add_argument("--tiles", type=int, default=10_000)
    parser.add_argument("--subset", type=int, default=40, help="slides run with both stores")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of each store on the subset, alternated"
    )
    parser.add_argument(
        "--folder",
        type=Path,
        default=None,
        help="where the cohort is written (default /tmp/cpath_mil_scale_<slides>x<tiles>)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="12 slides x 500 tiles, 1 epoch, 1 round"
    )
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        spec = json.loads(args.measure)
        print(json.dumps(data_path(spec) if spec.get("data_path") else measure(spec)))
        return
    if args.quick:
        args.slides, args.tiles, args.subset, args.epochs, args.rounds = 12, 500, 6, 1, 1
    folder = args.folder or Path(f"/tmp/cpath_mil_scale_{args.slides}x{args.tiles}")
    written, seconds = make_cohort(folder, args.slides, args.tiles)
    disk_gb = args.slides * args.tiles * DIM * 2 / 1e9
    train = sum(r["split"] == "train" for r in cohort_rows(args.slides))
    print(
        f"{args.slides} slides x {args.tiles} tiles x {DIM} float16 ({disk_gb:.2f} GB as float16, "
        f"{2 * disk_gb:.2f} GB as float32) in {folder}: {written} written in {seconds:.0f} s, "
        f"{args.slides - written} reused"
    )
    print(
        f"ABMIL (defaults), fp32, 4096 instances per training bag, {train} train / "
        f"{args.slides - train} validation bags, {os.cpu_count()} CPUs; epoch = training + "
        "validation; peak RSS per fresh process"
    )
    common = {"folder": str(folder), "epochs": args.epochs}
    print(f"  all {args.slides} slides:")
    full = run_measure(**common, slides=args.slides, store="disk", cold=True)
    print(describe(full, True))
    files = [folder / f"{r['slide_id']}.h5" for r in cohort_rows(args.slides)]
    cached = page_cache_gb(files)
    if cached is not None:
        size = sum(p.stat().st_size for p in files) / 1e9
        print(
            f"    {'':24s} the page cache held {cached:.2f} of the {size:.2f} GB of files "
            "after the run"
        )
    print(f"    {'memory':24s} not run: it would hold {2 * disk_gb:.2f} GB of float32 features")
    sub_gb = args.subset * args.tiles * DIM * 2 / 1e9
    print(
        f"  first {args.subset} slides ({sub_gb:.2f} GB as float16, {2 * sub_gb:.2f} GB as float32):"
    )
    runs = []
    for kind in ["memory", "disk", "disk", "memory"] * (args.rounds // 2) + ["memory", "disk"] * (
        args.rounds % 2
    ):
        runs.append(run_measure(**common, slides=args.subset, store=kind, cold=False))
        print(describe(runs[-1], False))
    cold = run_measure(**common, slides=args.subset, store="disk", cold=True)
    print(describe(cold, True))
    epochs = {
        k: [t for r in runs if r["store"] == k for t in r["epochs_s"]] for k in ("memory", "disk")
    }
    best = {k: min(t) for k, t in epochs.items()}
    middle = {k: statistics.median(t) for k, t in epochs.items()}
    print(
        f"  ratio disk / memory epoch time: {best['disk'] / best['memory']:.2f}x on the best "
        f"epoch of each ({best['disk']:.2f} / {best['memory']:.2f} s), "
        f"{middle['disk'] / middle['memory']:.2f}x on the medians of {len(epochs['disk'])} "
        f"epochs each ({middle['disk']:.2f} / {middle['memory']:.2f} s); from a cold page "
        f"cache {min(cold['epochs_s']) / best['memory']:.2f}x (best epoch)"
    )
    path = run_measure(**common, slides=args.subset, data_path=True)
    print(
        f"  batches alone, the two stores taking turns bag by bag (ms per bag, median): training "
        f"batch of 4096 instances {path['memory_train']:.1f} memory / {path['disk_train']:.1f} "
        f"disk, whole bag {path['memory_whole']:.1f} / {path['disk_whole']:.1f}"
    )
    same = len({round(r["val_loss"], 6) for r in [*runs, cold]}) == 1
    print(f"  same validation loss with every store: {'yes' if same else 'NO'}")
    base = statistics.median(r["baseline_mib"] for r in [*runs, cold, full])
    above = {
        k: max(r["peak_rss_mib"] - r["baseline_mib"] for r in runs if r["store"] == k)
        for k in ("memory", "disk")
    }
    print(
        f"  peak RSS above the Python + torch baseline ({base:.0f} MiB): memory store "
        f"{above['memory']:.0f} MiB at {args.subset} slides; disk store {above['disk']:.0f} MiB "
        f"at {args.subset} slides, {full['peak_rss_mib'] - full['baseline_mib']:.0f} MiB at "
        f"{args.slides}"
    )


if __name__ == "__main__":
    main()
