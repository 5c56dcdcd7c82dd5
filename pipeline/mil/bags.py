"""Bags of tile features, held in memory or read from their files, and their padded batches.

Two stores with one interface (:class:`BaseBagStore`: ``slide_ids``, ``index``, ``lengths``,
``offsets``, ``dim``, ``fingerprint``, :meth:`~BaseBagStore.bag`, :meth:`~BaseBagStore.rows`,
:meth:`~BaseBagStore.bag_coords`, :meth:`~BaseBagStore.statistics`):

- :class:`BagStore` reads each slide's feature file once into one contiguous ``T x D``
  float32 tensor (plus offsets), so epochs index memory instead of re-reading h5 files.
  Its memory is 4 bytes per feature of the cohort: ``T x D x 4`` (a float16 file takes
  half of that on disk).
- :class:`DiskBagStore` keeps the features in the files: it reads only their shapes when it
  opens, and a bag's rows when the bag is asked for, through a small LRU cache of bags
  bounded in bytes. Its memory does not grow with the cohort (the operating system's page
  cache, which the kernel reclaims as needed, keeps recently read files).

Both give bit-identical float32 bags (the stored values converted to float32 alike).
:func:`open_bag_store` picks one: ``auto`` holds the features in memory when their float32
size fits a memory budget (default a quarter of the machine's memory), else reads them
from disk. :func:`collate` builds ``B x N x D`` batches with a ``B x N`` mask, optionally
subsampling each bag to at most ``max_instances`` random instances (training), or keeping
whole bags (evaluation).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)

STORES = ("auto", "memory", "disk")
DEFAULT_CACHE_BYTES = 256 * 2**20  # decoded bags kept by DiskBagStore (LRU)


@dataclass(frozen=True)
class BagIndex:
    """What the feature files of a cohort hold, from their dataset shapes (no data read)."""

    folder: Path
    slide_ids: list[str]
    paths: list[Path]
    lengths: list[int]
    dim: int
    stamps: list[tuple[int, int]]  # per file: size, modification time (ns)
    fingerprint: str
    encoder: dict | None = None  # what made the features (:func:`encoder_identity`), if known

    @property
    def float32_bytes(self) -> int:
        """Bytes of all bags as one float32 tensor (what :class:`BagStore` holds)."""
        return sum(self.lengths) * self.dim * 4


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise PipelineError(
            f"{path}: cannot read the feature file ({exc}); rerun `cpath extract` for this slide"
        ) from exc


def _features(f: h5py.File, path: Path) -> h5py.Dataset:
    if "features" not in f:
        raise PipelineError(
            f"{path}: no 'features' dataset in the feature file; rerun "
            "`cpath extract` for this slide"
        )
    ds = f["features"]
    if len(ds.shape) != 2:
        raise PipelineError(
            f"{path}: 'features' has shape {ds.shape}, not tiles x features; "
            "rerun `cpath extract` for this slide"
        )
    return ds


# the feature-file attributes that tell which model made the features, and how
ENCODER_ATTRS = ("encoder", "encoder_sha256", "encoder_key", "output_mode", "pooling")


def encoder_identity(attrs) -> dict | None:
    """What made a feature file's features (its ``ENCODER_ATTRS``; None for a file that
    records no encoder). Two files hold comparable features when their identities are equal
    up to ``encoder`` (the name or path it was loaded by)."""
    if "encoder_sha256" not in attrs:
        return None
    return {k: str(attrs[k]) for k in ENCODER_ATTRS if k in attrs and str(attrs[k]) != "None"}


def _comparable(identity: dict) -> str:
    # without the name or path it was loaded by: the same weights may be loaded by either
    return json.dumps({k: v for k, v in identity.items() if k != "encoder"}, sort_keys=True)


def same_encoder(a: dict | None, b: dict | None) -> bool:
    """``a`` and ``b`` (:func:`encoder_identity`) name the same weights and output."""
    return a is not None and b is not None and _comparable(a) == _comparable(b)


def scan_bags(features_dir: str | os.PathLike, slide_ids: list[str]) -> BagIndex:
    """The shapes of ``<features_dir>/<slide_id>.h5`` (metadata only) and the encoder that
    made them: an error naming the slides without a file, files of different feature sizes,
    or files of different encoders."""
    folder = Path(features_dir)
    paths = [folder / f"{slide_id}.h5" for slide_id in slide_ids]
    missing = [s for s, path in zip(slide_ids, paths, strict=True) if not path.is_file()]
    if missing:
        raise PipelineError(
            f"{folder}: no features for {len(missing)} slides "
            f"({', '.join(missing[:5])}); run `cpath extract` for them"
        )
    lengths, dims, stamps, encoders = [], [], [], {}
    for slide_id, path in zip(slide_ids, paths, strict=True):
        stamps.append(_stamp(path))
        with _open(path) as f:
            n, d = _features(f, path).shape
            identity = encoder_identity(f.attrs)
        lengths.append(int(n))
        dims.append(int(d))
        if identity is not None:
            encoders.setdefault(_comparable(identity), (slide_id, identity))
    if len(set(dims)) > 1:
        by_dim = {
            d: [s for s, e in zip(slide_ids, dims, strict=True) if e == d][:3] for d in set(dims)
        }
        raise PipelineError(
            f"{folder}: feature files of different sizes {by_dim}; extract all "
            "slides with one encoder and pooling"
        )
    if len(encoders) > 1:
        seen = "; ".join(f"{s}: {e}" for s, e in list(encoders.values())[:3])
        raise PipelineError(
            f"{folder}: feature files of different encoders ({seen}); extract all slides "
            "with one encoder and pooling, into one folder per encoder"
        )
    # which files were read, as written (size, modification time): a re-extraction changes it
    named = [(s, *stamp) for s, stamp in zip(slide_ids, stamps, strict=True)]
    fingerprint = hashlib.sha256(json.dumps(named).encode()).hexdigest()
    encoder = next(iter(encoders.values()))[1] if encoders else None
    return BagIndex(
        folder,
        list(slide_ids),
        paths,
        lengths,
        dims[0] if dims else 0,
        stamps,
        fingerprint,
        encoder,
    )


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _read_features(path: Path, n: int, dim: int) -> np.ndarray:
    """``n x D`` features of one file, in their stored dtype."""
    with _open(path) as f:
        ds = _features(f, path)
        if ds.shape != (n, dim):
            raise PipelineError(
                f"{path}: features of shape {ds.shape}, {(n, dim)} when this run "
                "opened it; the file was rewritten meanwhile: run again"
            )
        return ds[()]


def _read_coords(path: Path) -> torch.Tensor:
    """``n x 2`` int64 coords of one file (``0 x 2`` when it has none)."""
    with _open(path) as f:
        coords = np.asarray(f["coords"][()], np.int64) if "coords" in f else np.zeros((0, 2))
    return torch.from_numpy(coords.astype(np.int64).reshape(-1, 2))


class BaseBagStore:
    """The bags of ``scanned.slide_ids``: their position (``index``), lengths, offsets in
    the cohort, feature size and the fingerprint of the files; subclasses say where the
    features are held."""

    def __init__(self, scanned: BagIndex):
        self.slide_ids = list(scanned.slide_ids)
        self.index = {s: i for i, s in enumerate(self.slide_ids)}
        self.paths = list(scanned.paths)
        self.lengths = torch.tensor(scanned.lengths, dtype=torch.long)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])
        self.dim = scanned.dim
        self.fingerprint = scanned.fingerprint
        self.encoder = scanned.encoder
        self._stamps = list(scanned.stamps)
        self._n = list(scanned.lengths)

    def length(self, slide_id: str) -> int:
        """Instances (tiles) of one bag."""
        return self._n[self.index[slide_id]]

    def bag(self, slide_id: str) -> torch.Tensor:
        """``n x D`` float32 features of one bag (may share memory with the store: do not
        modify it in place)."""
        raise NotImplementedError

    def rows(self, slide_id: str, keep: torch.Tensor) -> torch.Tensor:
        """``k x D`` float32 features of the rows ``keep`` (``k`` sorted indices) of one bag."""
        return self.bag(slide_id)[keep]

    def bag_coords(self, slide_id: str) -> torch.Tensor:
        """``n x 2`` int64 level-0 coords of one bag's tiles."""
        raise NotImplementedError

    def statistics(self, slide_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and std (``D`` each) over the instances of ``slide_ids``, one bag
        at a time."""
        total = torch.zeros(self.dim, dtype=torch.float64)
        squares = torch.zeros(self.dim, dtype=torch.float64)
        n = 0
        for slide_id in slide_ids:
            bag = self.bag(slide_id).double()  # n x D
            total += bag.sum(0)
            squares += (bag * bag).sum(0)
            n += len(bag)
        mean = total / max(n, 1)
        std = (squares / max(n, 1) - mean * mean).clamp_min(0).sqrt()
        return mean.float(), std.float().clamp_min(1e-6)


class BagStore(BaseBagStore):
    """Features of many slides in one contiguous float32 tensor (``T x D``), read once."""

    def __init__(
        self, features_dir: str | os.PathLike, slide_ids: list[str], scanned: BagIndex | None = None
    ):
        scanned = scanned if scanned is not None else scan_bags(features_dir, slide_ids)
        super().__init__(scanned)
        # filled file by file: no second copy of the cohort while it is read
        self.features = torch.empty(int(self.offsets[-1]), self.dim)  # T x D
        self.coords = []  # per bag, n x 2
        for i, path in enumerate(self.paths):
            a, b = int(self.offsets[i]), int(self.offsets[i + 1])
            self.features[a:b] = torch.from_numpy(_read_features(path, b - a, self.dim))
            self.coords.append(_read_coords(path))

    def bag(self, slide_id: str) -> torch.Tensor:
        i = self.index[slide_id]
        return self.features[self.offsets[i] : self.offsets[i + 1]]  # n x D (a view)

    def bag_coords(self, slide_id: str) -> torch.Tensor:
        return self.coords[self.index[slide_id]]


class DiskBagStore(BaseBagStore):
    """Features left in their h5 files: a bag is read when asked for (files stay closed in
    between), and the last bags read are kept, in their stored dtype, in an LRU cache of at
    most ``cache_bytes`` (a bag larger than that is not kept).

    Counters: ``reads`` (bags read from files), ``hits`` (bags served from the cache),
    ``cached_bytes`` (held now) and ``peak_cached_bytes`` (the most held at once).
    """

    def __init__(
        self,
        features_dir: str | os.PathLike,
        slide_ids: list[str],
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        scanned: BagIndex | None = None,
    ):
        scanned = scanned if scanned is not None else scan_bags(features_dir, slide_ids)
        super().__init__(scanned)
        self.cache_bytes = max(0, int(cache_bytes))
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cached_bytes = self.peak_cached_bytes = 0
        self.reads = self.hits = 0

    def _stored(self, slide_id: str) -> np.ndarray:
        """``n x D`` features of one bag as stored (float16 or float32), cached."""
        array = self._cache.get(slide_id)
        if array is not None:
            self._cache.move_to_end(slide_id)
            self.hits += 1
            return array
        i = self.index[slide_id]
        path = self.paths[i]
        try:
            stamp = _stamp(path)
        except OSError as exc:
            raise PipelineError(
                f"{path}: cannot read the feature file ({exc}); it was there "
                "when this run started: restore it and run again"
            ) from exc
        if stamp != self._stamps[i]:  # the fingerprint of the run names the files as opened
            raise PipelineError(
                f"{path}: rewritten since this run opened it (size, modification "
                "time); run again once the feature files are final"
            )
        array = _read_features(path, self._n[i], self.dim)  # n x D
        self.reads += 1
        if array.nbytes <= self.cache_bytes:
            while self.cached_bytes + array.nbytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self.cached_bytes -= old.nbytes
            self._cache[slide_id] = array
            self.cached_bytes += array.nbytes
            self.peak_cached_bytes = max(self.peak_cached_bytes, self.cached_bytes)
        return array

    def bag(self, slide_id: str) -> torch.Tensor:
        return torch.from_numpy(self._stored(slide_id)).float()  # n x D

    def rows(self, slide_id: str, keep: torch.Tensor) -> torch.Tensor:
        # select in the stored dtype, then convert only the kept rows (exact either way)
        return torch.from_numpy(self._stored(slide_id))[keep].float()  # k x D

    def bag_coords(self, slide_id: str) -> torch.Tensor:
        return _read_coords(self.paths[self.index[slide_id]])


def machine_memory() -> int | None:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit when
    lower; None when unknown."""
    sizes = []
    with contextlib.suppress(AttributeError, ValueError, OSError):  # not on every system
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            sizes.append(int(text))
    return min(sizes) if sizes else None


def default_memory_budget() -> int:
    """A quarter of :func:`machine_memory` (4 GB when that is unknown)."""
    memory = machine_memory()
    return memory // 4 if memory else 4 * 10**9


def open_bag_store(
    features_dir: str | os.PathLike,
    slide_ids: list[str],
    store: str = "auto",
    budget_bytes: int | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> BaseBagStore:
    """The bags of ``slide_ids``: in memory (:class:`BagStore`) or read from their files
    (:class:`DiskBagStore`). ``auto`` holds them in memory when their float32 size (from the
    files' shapes) is at most ``budget_bytes`` (None: :func:`default_memory_budget`), and
    logs the choice and why. The disk store's cache holds at most ``cache_bytes`` (and no
    more than the budget)."""
    if store not in STORES:
        raise ConfigError(f"store '{store}': use auto, memory or disk")
    if budget_bytes is not None and budget_bytes < 0:
        raise ConfigError(f"memory budget {budget_bytes} bytes: use 0 or more")
    index = scan_bags(features_dir, slide_ids)
    need = index.float32_bytes
    size = (
        f"{len(index.slide_ids)} slides, {sum(index.lengths)} tiles x {index.dim}: "
        f"{need / 1e9:.2f} GB as float32"
    )
    budget = budget_bytes if budget_bytes is not None else default_memory_budget()
    if store == "auto":
        store = "memory" if need <= budget else "disk"
        whence = "memory_budget_gb" if budget_bytes is not None else "a quarter of the memory"
        verdict = "within" if store == "memory" else "over"
        why = f"{size}, {verdict} the memory budget of {budget / 1e9:.2f} GB ({whence})"
    else:
        why = f"{size}; as configured"
    if store == "memory":
        log.info("bag store: memory (%s)", why)
        return BagStore(features_dir, slide_ids, scanned=index)
    cache = min(cache_bytes, budget)
    log.info(
        "bag store: disk, each bag read from its file when needed, cache %.0f MB (%s)",
        cache / 1e6,
        why,
    )
    return DiskBagStore(features_dir, slide_ids, cache_bytes=cache, scanned=index)


def collate(
    store: BaseBagStore,
    slide_ids: list[str],
    max_instances: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B x N x D features, B x N mask)`` of the named bags, zero-padded to the longest."""
    bags = []
    for slide_id in slide_ids:
        n = store.length(slide_id)
        if max_instances is not None and n > max_instances:
            keep = torch.randperm(n, generator=generator)[:max_instances]
            bags.append(store.rows(slide_id, keep.sort().values))  # max_instances x D
        else:
            bags.append(store.bag(slide_id))  # n x D
    if len(bags) == 1 and len(bags[0]):  # one bag: a view, nothing to pad or copy
        return bags[0][None], torch.ones(1, len(bags[0]), dtype=torch.bool)
    n = max((len(b) for b in bags), default=0)
    features = torch.zeros(len(bags), max(n, 1), store.dim)  # B x N x D
    mask = torch.zeros(len(bags), max(n, 1), dtype=torch.bool)  # B x N
    for i, bag in enumerate(bags):
        features[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return features, mask
