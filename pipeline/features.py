"""Per-slide feature files: ``features`` (N x D) and ``coords`` (N x 2) in HDF5, streamed.

Layout (CLAM-compatible: ``features`` + ``coords`` datasets)::

    <slide_id>.h5
      features   N x D float16 or float32, row i = tile i of the slide's coords file
      coords     N x 2 int64 level-0 (x, y), the coords file's rows in order
      attrs      slide_id, slide_path, encoder, encoder_sha256, weights (pretrained or
                 random), embed_dim, pooling, encoder_key and output_mode (zoo
                 encoders only), transform (JSON), precision, dtype (as asked:
                 float16, float32 or auto; the dataset's own dtype is what was stored),
                 target_mpp, patch_size, patch_size_level0, coords_sha256, stain_norm,
                 stain_norm_sha256, n_tiles, package_version, schema_version, complete
      coords.attrs  the coords file's attributes, with the names CLAM and TRIDENT read
                 (see :mod:`pipeline.wsi.coords`)

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


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


class FeatureWriter:
    """Stream the features of one slide into ``path`` (temporary name until :meth:`close`).

    ``dtype`` is ``float16``, ``float32`` or ``auto`` (float16 until a row does not fit it,
    then the rows so far are copied into a float32 dataset and the rest follow). Rows that are
    not finite, or that do not fit float16 when ``dtype`` is float16, raise
    :class:`~pipeline.errors.PipelineError`: nothing is ever stored as inf or NaN.
    ``coords_attrs`` go on the ``coords`` dataset, where CLAM- and TRIDENT-style readers look.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        n_tiles: int,
        dim: int,
        coords: np.ndarray,
        attrs: dict,
        dtype: str = "float16",
        chunk_rows: int = 1024,
        coords_attrs: dict | None = None,
    ):
        if dtype not in ("float16", "float32", "auto"):
            raise ValueError(f"dtype must be float16, float32 or auto, got {dtype!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_path(self.path)
        self.n_tiles, self.written, self.dtype = n_tiles, 0, dtype
        self.chunks = (max(1, min(chunk_rows, n_tiles)), dim) if n_tiles else None
        self.file = h5py.File(self.tmp, "w")
        self.features = self.file.create_dataset(
            "features",
            shape=(n_tiles, dim),
            dtype="float32" if dtype == "float32" else "float16",
            chunks=self.chunks,
        )
        data = self.file.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        for key, value in (coords_attrs or {}).items():
            data.attrs[key] = json.dumps(value) if isinstance(value, dict) else value
        base = {
            "n_tiles": n_tiles,
            "embed_dim": dim,
            "dtype": dtype,
            "schema_version": SCHEMA_VERSION,
            "package_version": pipeline.__version__,
        }
        for key, value in {**attrs, **base}.items():
            self.file.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value

    def write(self, rows: np.ndarray, start: int) -> None:
        """Write ``rows`` (k x D) at tile index ``start``."""
        rows = np.asarray(rows, np.float32)  # k x D
        finite = np.isfinite(rows).all(1)
        if not finite.all():
            bad = start + np.flatnonzero(~finite)
            raise PipelineError(
                f"{self.path.stem}: the encoder gave NaN or inf features for {len(bad)} tiles "
                f"(rows {', '.join(map(str, bad[:5]))}); check the encoder weights, or use "
                "--precision bf16 or fp32 if fp16 autocast overflows"
            )
        if self.features.dtype == np.float16:
            over = np.abs(rows).max(1) > FLOAT16_MAX
            if over.any() and self.dtype == "auto":
                self._widen()
            elif over.any():
                bad = start + np.flatnonzero(over)
                raise PipelineError(
                    f"{self.path.stem}: features of {len(bad)} tiles (rows "
                    f"{', '.join(map(str, bad[:5]))}) exceed float16's range (max |x| "
                    f"{np.abs(rows).max():.4g} > 65504); extract with --dtype float32 or auto"
                )
        self.features[start : start + len(rows)] = rows
        self.written += len(rows)

    def _widen(self) -> None:
        """Move the float16 rows written so far into a float32 ``features`` dataset."""
        old = self.features
        new = self.file.create_dataset(
            "features_float32", shape=old.shape, dtype="float32", chunks=self.chunks
        )
        step = self.chunks[0] if self.chunks else 1024
        for i in range(0, old.shape[0], step):  # bounded memory: one chunk at a time
            new[i : i + step] = old[i : i + step].astype(np.float32)
        del self.file["features"]
        self.file.move("features_float32", "features")
        self.features = self.file["features"]

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
            attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
    except (OSError, KeyError) as exc:
        raise PipelineError(f"{path}: cannot read the feature file ({exc}); rerun extract") from exc
    return feats, coords, attrs


def is_complete(path: str | os.PathLike, expect: dict) -> bool:
    """Whether ``path`` is a whole feature file made with the settings in ``expect``."""
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
            rows = f["features"].shape[0]
    except (OSError, KeyError):
        return False
    if not attrs.get("complete") or rows != attrs.get("n_tiles"):
        return False
    return all(attrs.get(k) == expect.get(k) for k in MATCH_KEYS if k in expect)


def plain_attr(value):
    """An h5 attribute as Python: str for bytes, a scalar for numpy ones, JSON text parsed."""
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
