"""Bags of tile features held in memory once per run, and their padded batches.

:class:`BagStore` reads each slide's feature file once into one contiguous ``T x D``
tensor (plus offsets), so epochs index memory instead of re-reading h5 files.
:func:`collate` builds ``B x N x D`` batches with a ``B x N`` mask by slicing that tensor
per bag (no per-instance Python work), optionally subsampling each bag to at most
``max_instances`` random instances (training), or keeping whole bags (evaluation).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.features import read_features


class BagStore:
    """Features and coords of many slides in two contiguous tensors."""

    def __init__(self, features_dir: str | os.PathLike, slide_ids: list[str]):
        folder = Path(features_dir)
        feats, coords, missing, stamps = [], [], [], []
        for slide_id in slide_ids:
            path = folder / f"{slide_id}.h5"
            if not path.is_file():
                missing.append(slide_id)
                continue
            stat = path.stat()
            stamps.append((slide_id, stat.st_size, stat.st_mtime_ns))
            f, c, _ = read_features(path)
            feats.append(torch.from_numpy(np.asarray(f, np.float32)))
            coords.append(torch.from_numpy(np.asarray(c, np.int64).reshape(-1, 2)))
        if missing:
            raise PipelineError(f"{folder}: no features for {len(missing)} slides "
                                f"({', '.join(missing[:5])}); run `cpath extract` for them")  # fmt: skip
        dims = {f.shape[1] for f in feats}
        if len(dims) > 1:
            by_dim = {
                d: [s for s, f in zip(slide_ids, feats, strict=True) if f.shape[1] == d][:3]
                for d in dims
            }
            raise PipelineError(f"{folder}: feature files of different sizes {by_dim}; extract all "
                                "slides with one encoder and pooling")  # fmt: skip
        self.slide_ids = list(slide_ids)
        self.index = {s: i for i, s in enumerate(self.slide_ids)}
        self.lengths = torch.tensor([len(f) for f in feats])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.lengths.cumsum(0)])
        self.features = torch.cat(feats) if feats else torch.zeros(0, 0)  # T x D
        self.coords = torch.cat(coords) if coords else torch.zeros(0, 2, dtype=torch.long)
        self.dim = int(self.features.shape[1]) if feats else 0
        # which files were read, as written (size, modification time): a re-extraction changes it
        self.fingerprint = hashlib.sha256(json.dumps(stamps).encode()).hexdigest()

    def bag(self, slide_id: str) -> torch.Tensor:
        i = self.index[slide_id]
        return self.features[self.offsets[i] : self.offsets[i + 1]]  # n x D (a view)

    def statistics(self, slide_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and std (``D`` each) over the instances of ``slide_ids``."""
        total = torch.zeros(self.dim, dtype=torch.float64)
        squares = torch.zeros(self.dim, dtype=torch.float64)
        n = 0
        for slide_id in slide_ids:
            bag = self.bag(slide_id).double()
            total += bag.sum(0)
            squares += (bag * bag).sum(0)
            n += len(bag)
        mean = total / max(n, 1)
        std = (squares / max(n, 1) - mean * mean).clamp_min(0).sqrt()
        return mean.float(), std.float().clamp_min(1e-6)

    def bag_coords(self, slide_id: str) -> torch.Tensor:
        i = self.index[slide_id]
        return self.coords[self.offsets[i] : self.offsets[i + 1]]


def collate(store: BagStore, slide_ids: list[str], max_instances: int | None = None,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(B x N x D features, B x N mask)`` of the named bags, zero-padded to the longest."""
    bags = []
    for slide_id in slide_ids:
        bag = store.bag(slide_id)
        if max_instances is not None and len(bag) > max_instances:
            keep = torch.randperm(len(bag), generator=generator)[:max_instances]
            bag = bag[keep.sort().values]
        bags.append(bag)
    if len(bags) == 1 and len(bags[0]):  # one bag: a view, nothing to pad or copy
        return bags[0][None], torch.ones(1, len(bags[0]), dtype=torch.bool)
    n = max((len(b) for b in bags), default=0)
    features = torch.zeros(len(bags), max(n, 1), store.dim)
    mask = torch.zeros(len(bags), max(n, 1), dtype=torch.bool)
    for i, bag in enumerate(bags):
        features[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return features, mask
