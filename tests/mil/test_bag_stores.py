"""Bags held in memory against bags read from their files: the same values, the same
training, the choice between them, and the disk store's bounded cache."""

import csv
import logging

import h5py
import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, PipelineError
from pipeline.features import FeatureWriter
from pipeline.mil.bags import BagStore, DiskBagStore, collate, open_bag_store
from pipeline.mil.train import TrainMILConfig
from pipeline.mil.training import train_cv

D = 8
LENGTHS = [5, 37, 12, 64, 1, 23]


def write_cohort(folder, dtype="float16", lengths=LENGTHS, seed=0, signal=False):
    """Feature files of ``len(lengths)`` slides (``s<i>``) with random coords; with
    ``signal``, odd slides hold instances shifted along one direction."""
    rng = np.random.default_rng(seed)
    ids = []
    for i, n in enumerate(lengths):
        feats = rng.normal(size=(n, D)).astype(np.float32)
        if signal and i % 2:
            feats[: max(1, n // 4)] += 3.0
        coords = rng.integers(0, 10**5, size=(n, 2))
        writer = FeatureWriter(folder / f"s{i:02d}.h5", n, D, coords, {}, dtype, chunk_rows=16)
        writer.write(feats, 0)
        writer.close()
        ids.append(f"s{i:02d}")
    return ids


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_disk_store_gives_the_memory_stores_bags_coords_statistics_and_batches(tmp_path, dtype):
    ids = write_cohort(tmp_path, dtype)
    memory = BagStore(tmp_path, ids)
    disk = DiskBagStore(tmp_path, ids, cache_bytes=0)
    assert disk.reads == 0  # opening reads shapes only
    assert disk.slide_ids == memory.slide_ids and disk.index == memory.index
    assert torch.equal(disk.lengths, memory.lengths) and torch.equal(disk.offsets, memory.offsets)
    assert disk.dim == memory.dim == D and disk.fingerprint == memory.fingerprint
    for slide_id, n in zip(ids, LENGTHS, strict=True):
        with h5py.File(tmp_path / f"{slide_id}.h5") as f:
            stored = f["features"][()]
            coords = f["coords"][()]
        bag = disk.bag(slide_id)
        assert bag.dtype == torch.float32 and bag.shape == (n, D)
        assert torch.equal(bag, memory.bag(slide_id))
        assert torch.equal(bag, torch.from_numpy(stored.astype(np.float32)))
        assert torch.equal(disk.bag_coords(slide_id), memory.bag_coords(slide_id))
        assert torch.equal(disk.bag_coords(slide_id), torch.from_numpy(coords))
    assert disk.reads == len(ids)
    for a, b in zip(disk.statistics(ids[1:4]), memory.statistics(ids[1:4]), strict=True):
        assert torch.equal(a, b)
    for batch in (ids[:3], ids[3:4], ids):
        x, mask = collate(disk, batch)
        assert all(
            torch.equal(a, b) for a, b in zip((x, mask), collate(memory, batch), strict=True)
        )
        assert x.shape == (len(batch), max(LENGTHS[int(s[1:])] for s in batch), D)
    for cap in (4, 30):  # subsampled training batches: the same random rows
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        for _ in range(3):
            x, mask = collate(disk, ids, cap, g1)
            y, mask2 = collate(memory, ids, cap, g2)
            assert torch.equal(x, y) and torch.equal(mask, mask2)
            assert mask.sum(1).tolist() == [min(n, cap) for n in LENGTHS]


def _cohort_labels(path, ids):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "case_id", "label"])
        for i, slide_id in enumerate(ids):
            writer.writerow([slide_id, f"case_{i // 2:02d}", "tumor" if i % 2 else "normal"])


def test_training_on_the_disk_store_predicts_as_on_the_memory_store(tmp_path, caplog):
    lengths = [int(n) for n in np.random.default_rng(1).integers(10, 40, size=16)]
    ids = write_cohort(tmp_path / "feats", "float16", lengths, signal=True)
    _cohort_labels(tmp_path / "labels.csv", ids)
    base = {
        "features": tmp_path / "feats",
        "labels": tmp_path / "labels.csv",
        "folds": 2,
        "epochs": 3,
        "lr": 2e-3,
        "max_instances": 16,
        "batch_size": 2,
        "bootstrap": 0,
        "progress": False,
        "device": "cpu",
        "model_args": {"hidden": 16, "attn_dim": 8},
    }
    caplog.set_level(logging.INFO, logger="pipeline.mil.bags")
    memory = train_cv(TrainMILConfig(**base, out=tmp_path / "memory", store="memory"))
    assert "bag store: memory" in caplog.text
    caplog.clear()
    # a budget of 1 kB: the disk store's cache holds no bag, every bag is read from its file
    disk = train_cv(
        TrainMILConfig(**base, out=tmp_path / "disk", store="disk", memory_budget_gb=1e-6)
    )
    assert "bag store: disk" in caplog.text
    assert disk == memory
    read = {name: (tmp_path / name / "predictions.csv").read_text() for name in ("memory", "disk")}
    assert read["disk"] == read["memory"] and len(read["disk"].splitlines()) == 17


def test_switching_the_store_reuses_finished_folds(tmp_path):
    """The store changes where bags are held, not the models: finished folds stay."""
    ids = write_cohort(tmp_path / "feats", "float16", [12] * 10, signal=True)
    _cohort_labels(tmp_path / "labels.csv", ids)
    run = {
        "features": tmp_path / "feats",
        "labels": tmp_path / "labels.csv",
        "folds": 2,
        "epochs": 1,
        "bootstrap": 0,
        "progress": False,
        "device": "cpu",
        "out": tmp_path / "run",
        "model_args": {"hidden": 8, "attn_dim": 4},
    }
    train_cv(TrainMILConfig(**run, store="memory"))
    ckpt = tmp_path / "run" / "fold_0" / "model.ckpt"
    stamp = ckpt.stat().st_mtime_ns
    train_cv(TrainMILConfig(**run, store="disk", memory_budget_gb=0.5))
    assert ckpt.stat().st_mtime_ns == stamp


def test_auto_holds_bags_in_memory_only_within_the_budget(tmp_path, caplog):
    ids = write_cohort(tmp_path)
    need = sum(LENGTHS) * D * 4  # float32 bytes of all bags
    caplog.set_level(logging.INFO, logger="pipeline.mil.bags")
    assert isinstance(open_bag_store(tmp_path, ids, "auto", budget_bytes=need), BagStore)
    assert "bag store: memory" in caplog.text and "within the memory budget" in caplog.text
    caplog.clear()
    store = open_bag_store(tmp_path, ids, "auto", budget_bytes=need - 1)
    assert isinstance(store, DiskBagStore) and store.reads == 0
    assert "bag store: disk" in caplog.text and "over the memory budget" in caplog.text
    assert store.cache_bytes <= need - 1  # the cache stays within the budget too
    assert isinstance(open_bag_store(tmp_path, ids, "auto", budget_bytes=1), DiskBagStore)
    assert isinstance(open_bag_store(tmp_path, ids, "auto", budget_bytes=10**12), BagStore)
    assert isinstance(open_bag_store(tmp_path, ids), BagStore)  # a quarter of the RAM: kB fit
    assert isinstance(open_bag_store(tmp_path, ids, "disk", budget_bytes=10**12), DiskBagStore)
    assert isinstance(open_bag_store(tmp_path, ids, "memory", budget_bytes=1), BagStore)
    assert TrainMILConfig().store == "auto" and TrainMILConfig().memory_budget_gb is None
    with pytest.raises(ConfigError, match="store 'ram': use auto, memory or disk"):
        open_bag_store(tmp_path, ids, "ram")


def test_disk_cache_stays_within_its_byte_bound(tmp_path):
    ids = write_cohort(tmp_path)
    size = {s: n * D * 2 for s, n in zip(ids, LENGTHS, strict=True)}  # float16 bytes
    bound = size["s03"]  # s03 (64 rows) alone, or up to 3 of the smaller bags
    store = DiskBagStore(tmp_path, ids, cache_bytes=bound)
    for _ in range(3):
        for slide_id in [*ids, *reversed(ids)]:
            store.bag(slide_id)
            assert 0 < store.cached_bytes <= bound
            assert store.cached_bytes == sum(a.nbytes for a in store._cache.values())
    assert store.peak_cached_bytes <= bound and store.reads + store.hits == 3 * 2 * len(ids)
    reads, hits = store.reads, store.hits
    store.bag("s00")  # the last bag used: served from the cache, not read
    assert (store.reads, store.hits) == (reads, hits + 1)
    (tmp_path / "s00.h5").unlink()  # the cache holds its values, not the file
    assert torch.equal(store.bag("s00"), store.bag("s00"))
    store.bag("s03")  # 64 rows: evicts every other bag
    assert list(store._cache) == ["s03"] and store.cached_bytes == size["s03"]
    with pytest.raises(PipelineError, match="s00.h5: cannot read the feature file"):
        store.bag("s00")  # evicted, then read again: the file is gone
    small = DiskBagStore(tmp_path, ids[1:], cache_bytes=min(size.values()) - 1)  # no bag fits
    small.statistics(ids[1:])
    assert small.reads == len(ids) - 1 and small.cached_bytes == small.peak_cached_bytes == 0


def test_files_that_change_or_lack_features_give_clear_errors(tmp_path):
    ids = write_cohort(tmp_path)
    store = DiskBagStore(tmp_path, ids, cache_bytes=0)
    store.bag("s01")
    with h5py.File(tmp_path / "s01.h5", "r+") as f:  # re-extracted while the store is open:
        f["features"][0] += 1  # same shape, other values
    with pytest.raises(PipelineError, match="s01.h5: rewritten since this run opened it"):
        store.bag("s01")
    writer = FeatureWriter(tmp_path / "s04.h5", 3, D, np.zeros((3, 2)), {}, "float16")
    writer.write(np.zeros((3, D), np.float16), 0)
    writer.close()  # another shape
    with pytest.raises(PipelineError, match="s04.h5: rewritten since this run opened it"):
        store.bag("s04")
    (tmp_path / "s05.h5").unlink()
    with pytest.raises(PipelineError, match="s05.h5: cannot read the feature file"):
        store.bag("s05")
    with h5py.File(tmp_path / "s02.h5", "w") as f:
        f["coords"] = np.zeros((2, 2), np.int64)
    with pytest.raises(PipelineError, match="s02.h5: no 'features' dataset"):
        open_bag_store(tmp_path, ids[:5], "disk")
    with pytest.raises(PipelineError, match=r"no features for 2 slides \(s05, ghost\)"):
        open_bag_store(tmp_path, [*ids, "ghost"], "disk")
