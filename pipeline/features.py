"""Per-slide feature files: ``features`` (N x D) and ``coords`` (N x 2) in HDF5, streamed.

Layout (CLAM-compatible: ``features`` + ``coords`` datasets)::

    <slide_id>.h5
      features   N x D float16 or float32, row i = tile i of the slide's coords file
      coords     N x 2 int64 level-0 (x, y), the coords file's rows in order
      attrs      slide_id, slide_path, encoder, encoder_sha256, embed_dim, pooling,
                 transform (JSON), precision, target_mpp, patch_size, patch_size_level0,
                 coords_sha256, stain_norm, stain_norm_sha256, n_tiles, package_version,
                 schema_version, complete

:class:`FeatureWriter` appends rows in chunks (memory does not grow with the slide),
writes under a temporary name and renames only when every row is in; a file under
the final name is therefore complete, and :func:`is_complete` checks that it also
matches the encoder and coords a rerun would use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

import pipeline
from pipeline.errors import PipelineError
from pipeline.io import temporary_path

SCHEMA_VERSION = 1
MATCH_KEYS = (
    "encoder",
    "encoder_sha256",
    "pooling",
    "precision",
    "coords_sha256",
    "dtype",
    "stain_norm_sha256",
)


class FeatureWriter:
    """Stream the features of one slide into ``path`` (temporary name until :meth:`close`)."""

    def __init__(self, path: str | os.PathLike, n_tiles: int, dim: int, coords: np.ndarray,
                 attrs: dict, dtype: str = "float16", chunk_rows: int = 1024):  # fmt: skip
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_path(self.path)
        self.n_tiles, self.written = n_tiles, 0
        self.file = h5py.File(self.tmp, "w")
        chunks = (max(1, min(chunk_rows, n_tiles)), dim)
        self.features = self.file.create_dataset("features", shape=(n_tiles, dim), dtype=dtype,
                                                 chunks=chunks if n_tiles else None)  # fmt: skip
        self.file.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        for key, value in {**attrs, "n_tiles": n_tiles, "embed_dim": dim, "dtype": dtype,
                           "schema_version": SCHEMA_VERSION,
                           "package_version": pipeline.__version__}.items():  # fmt: skip
            self.file.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value

    def write(self, rows: np.ndarray, start: int) -> None:
        """Write ``rows`` (k x D) at tile index ``start``."""
        self.features[start : start + len(rows)] = rows
        self.written += len(rows)

    def close(self) -> Path:
        """Mark complete and rename to the final name (only when every row was written)."""
        if self.written != self.n_tiles:
            self.abort()
            raise PipelineError(f"{self.path}: {self.written} of {self.n_tiles} rows written")
        self.file.attrs["complete"] = True
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file."""
        try:
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def read_features(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(features N x D, coords N x 2, attrs)`` of a feature file (ours or CLAM's)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            feats = np.asarray(f["features"][:])
            coords = np.asarray(f["coords"][:], np.int64) if "coords" in f else np.zeros((0, 2))
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
    except (OSError, KeyError) as exc:
        raise PipelineError(f"{path}: cannot read the feature file ({exc}); rerun extract") from exc
    return feats, coords, attrs


def is_complete(path: str | os.PathLike, expect: dict) -> bool:
    """Whether ``path`` is a whole feature file made with the settings in ``expect``."""
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            rows = f["features"].shape[0]
    except (OSError, KeyError):
        return False
    if not attrs.get("complete") or rows != attrs.get("n_tiles"):
        return False
    return all(attrs.get(k) == expect.get(k) for k in MATCH_KEYS if k in expect)


def _plain(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
