"""``weights.h5``: the curated sampling weights of every tile, slide by slide.

Layout::

    weights.h5
      slides/<slide_id>/coords    N x 2 int64, level-0 (x, y): the feature file's rows
      slides/<slide_id>/clusters  N x L int32, cluster id per level (0 the finest)
      slides/<slide_id>/weight    N float64, sampling weight (all slides' sum to 1)
      slides/<slide_id>.attrs     features (the feature file), slide_path, coords_sha256,
                                  group (with --groups)
      attrs                       config (JSON), clusters (per level, JSON), cluster_sizes
                                  (tiles per cluster, per level, JSON), n_tiles, n_slides,
                                  fingerprint, the encoder attributes of the features
                                  (encoder, encoder_sha256, ...)

Readers match tiles by slide id and level-0 coords (:func:`match_weights`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.features import plain_attr
from pipeline.io import atomic_path


@dataclass
class SlideWeights:
    """One slide's rows of a ``weights.h5``."""

    slide_id: str
    coords: np.ndarray  # N x 2 int64
    clusters: np.ndarray  # N x L int
    weight: np.ndarray  # N float64
    attrs: dict


def write_weights(path: Path, slides: Sequence[SlideWeights], attrs: dict) -> Path:
    """Write ``weights.h5`` atomically (see the module docstring)."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        root = f.create_group("slides")
        for s in slides:
            g = root.create_group(s.slide_id)
            g.create_dataset("coords", data=np.asarray(s.coords, np.int64).reshape(-1, 2))
            g.create_dataset("clusters", data=np.asarray(s.clusters, np.int32))
            g.create_dataset("weight", data=np.asarray(s.weight, np.float64))
            for key, value in s.attrs.items():
                if value is not None:
                    g.attrs[key] = value
        for key, value in attrs.items():
            if value is not None:
                f.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value
    return Path(path)


def read_attrs(path: Path) -> dict:
    """The file attributes of a ``weights.h5`` ({} when it cannot be read)."""
    try:
        with h5py.File(path, "r") as f:
            return {k: plain_attr(v) for k, v in f.attrs.items()}
    except OSError:
        return {}


def read_weights(path: Path) -> tuple[dict[str, SlideWeights], dict]:
    """``({slide_id: SlideWeights}, file attrs)`` of a ``weights.h5``."""
    try:
        with h5py.File(path, "r") as f:
            slides = {
                sid: SlideWeights(
                    sid,
                    np.asarray(g["coords"][:], np.int64),
                    np.asarray(g["clusters"][:]),
                    np.asarray(g["weight"][:], np.float64),
                    {k: plain_attr(v) for k, v in g.attrs.items()},
                )
                for sid, g in f["slides"].items()
            }
            attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
    except (OSError, KeyError) as exc:
        raise PipelineError(
            f"{path}: cannot read the sampling weights ({exc}); run `cpath curate` and pass "
            "its OUT/weights.h5"
        ) from exc
    return slides, attrs


def _keys(coords: np.ndarray) -> np.ndarray:
    """One int64 per level-0 (x, y) pair (x, y < 2^31)."""
    coords = np.asarray(coords, np.int64).reshape(-1, 2)  # N x 2
    return (coords[:, 0] << 31) | coords[:, 1]


def match_weights(
    path: Path, slide_ids: Sequence[str], coords: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], int]:
    """The weights of the tiles ``coords[s]`` (``N_s x 2`` level-0) of slides ``slide_ids``
    in ``path`` (a ``weights.h5``), in their order, and the number of tiles without a weight
    there (given weight 0). A slide absent from the file raises
    :class:`~pipeline.errors.PipelineError`."""
    table, _ = read_weights(path)
    missing = [sid for sid in slide_ids if sid not in table]
    if missing:
        raise PipelineError(
            f"{path}: no sampling weights for {len(missing)} of {len(slide_ids)} slides "
            f"({', '.join(missing[:5])}); rerun `cpath curate` on the features of these "
            "coords files, or drop them from --data.coords"
        )
    out, unmatched = [], 0
    for sid, rows in zip(slide_ids, coords, strict=True):
        entry = table[sid]
        keys = _keys(entry.coords)
        order = np.argsort(keys, kind="stable")
        want = _keys(rows)  # N_s
        at = np.clip(np.searchsorted(keys[order], want), 0, max(len(keys) - 1, 0))
        found = keys[order][at] == want if len(keys) else np.zeros(len(want), bool)
        weight = np.where(found, entry.weight[order][at] if len(keys) else 0.0, 0.0)
        unmatched += int((~found).sum())
        out.append(weight)
    return out, unmatched
