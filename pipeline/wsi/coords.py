"""The coords file: one HDF5 file per slide listing its tiles.

Schema (``schema_version`` 1)::

    coords           int64   N x 2   level-0 top-left (x, y) of each tile
    tissue_fraction  float32 N       tissue share of each tile (0-1)
    label            str     N       annotation class of each tile, "" for none (only with
                                     --annotations; attribute label_counts: JSON counts)
    attrs: schema_version, target_mpp, level0_mpp, mpp_source, patch_size (px at
           target_mpp), patch_size_level0, patch_level (pyramid level to read from),
           patch_level_downsample, overlap, min_tissue, tissue_method, tissue_params (JSON),
           slide_path, slide_id, level0_width, level0_height, package_version

Every attribute is on the file root. The ``coords`` dataset repeats the identity and
resolutions (``DATASET_KEYS``) and carries the attributes CLAM and TRIDENT read there
(:func:`reader_attrs`):

- TRIDENT (``f["coords"].attrs``): ``patch_size`` (px at the target resolution),
  ``patch_size_level0``, ``level0_magnification`` and ``target_magnification``. The two
  magnifications are ``10 / mpp`` (TRIDENT converts them back to um/px as ``10 / mag``), so
  a TRIDENT reader recovers the exact resolutions, not the scanner's rounded objective.
- CLAM (``Whole_Slide_Bag_FP``): ``patch_level``, ``patch_size``, ``downsample``,
  ``level_dim``, ``downsampled_level_dim``. CLAM reads ``patch_size`` px at ``patch_level``:
  the same field of view as ours exactly when the target mpp is that of a pyramid level
  (``clam_exact`` is then true), e.g. 0.5-mpp tiles of a 20x slide (level 0) or 1-mpp tiles
  of a 40x slide with a 4x level. Otherwise CLAM's reader would read a smaller field of
  view; TRIDENT's and ours read ``patch_size_level0`` level-0 px and resize.

:func:`read_coords` also reads the coords files that CLAM (``patch_level``, ``patch_size``
at that level, ``downsample``) and TRIDENT (``patch_size_level0``, ``target_magnification``)
write.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

import pipeline
from pipeline.errors import PipelineError
from pipeline.io import atomic_path

SCHEMA_VERSION = 1


@dataclass
class Coords:
    """The tiles of one slide and how to read them."""

    coords: np.ndarray  # N x 2 int64, level-0 (x, y)
    patch_size_level0: int  # level-0 px per tile side
    patch_size: int  # px per tile side at target_mpp
    target_mpp: float | None  # None when the file does not say (CLAM without mpp)
    tissue_fraction: np.ndarray | None = None  # N float32
    attrs: dict = field(default_factory=dict)  # every attribute as stored
    labels: np.ndarray | None = None  # N str, "" for none (annotated slides)

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def slide_path(self) -> str | None:
        return self.attrs.get("slide_path")


def reader_attrs(attrs: dict) -> dict:
    """The attributes CLAM's and TRIDENT's readers take from the ``coords`` dataset, derived
    from ours (see the module docstring for what each means and when CLAM's is exact)."""
    out: dict = {}
    if attrs.get("slide_id"):
        out["name"] = str(attrs["slide_id"])
    for key in ("patch_size", "patch_size_level0", "patch_level", "overlap"):
        if attrs.get(key) is not None:
            out[key] = int(attrs[key])
    level0_mpp, target_mpp = attrs.get("level0_mpp"), attrs.get("target_mpp")
    if level0_mpp and target_mpp and level0_mpp > 0 and target_mpp > 0:
        out["level0_magnification"] = 10.0 / float(level0_mpp)
        out["target_magnification"] = 10.0 / float(target_mpp)
    width, height = attrs.get("level0_width"), attrs.get("level0_height")
    if width and height:
        out["level0_width"], out["level0_height"] = int(width), int(height)
        out["level_dim"] = np.array([width, height], np.int64)
    ds = attrs.get("patch_level_downsample")
    if ds:
        out["downsample"] = np.array([ds, ds], np.float64)
        if width and height:
            out["downsampled_level_dim"] = np.array(
                [round(width / ds), round(height / ds)], np.int64
            )
        if level0_mpp and target_mpp and attrs.get("patch_size") is not None:
            # CLAM reads patch_size px at patch_level: exact when that level is the target's
            out["clam_exact"] = bool(abs(float(ds) * level0_mpp / target_mpp - 1) <= 0.01)
    return out


_STRING = h5py.string_dtype()  # variable-length UTF-8, as h5py stores a Python str
_TYPES: dict[np.dtype, tuple] = {}  # dtype -> HDF5 types as stored and in memory


def _write_attrs(node: h5py.HLObject, attrs: dict) -> None:
    """Set the attributes of a new HDF5 object (dicts as JSON strings).

    The types are those of ``node.attrs[key] = value`` (variable-length UTF-8 strings,
    int64, float64, numpy bools and arrays), written through h5py's low-level API with
    the types made once, which takes a third of the high-level's time per attribute.
    """
    scalar = h5py.h5s.create(h5py.h5s.SCALAR)
    for key, value in attrs.items():
        value = json.dumps(value) if isinstance(value, dict) else value
        data = np.array(value, dtype=_STRING) if isinstance(value, str) else np.asarray(value)
        if data.dtype not in _TYPES:
            _TYPES[data.dtype] = (
                h5py.h5t.py_create(data.dtype, logical=True),
                h5py.h5t.py_create(data.dtype),
            )
        stored, memory = _TYPES[data.dtype]
        space = scalar if data.ndim == 0 else h5py.h5s.create_simple(data.shape)
        h5py.h5a.create(node.id, key.encode(), stored, space).write(data, mtype=memory)


# Attributes repeated on the coords dataset beside those its readers take (reader_attrs)
DATASET_KEYS = ("schema_version", "slide_id", "target_mpp", "level0_mpp", "mpp_source")


def write_coords(
    path: str | os.PathLike,
    coords: np.ndarray,
    tissue_fraction: np.ndarray,
    attrs: dict,
    labels: np.ndarray | None = None,
) -> Path:
    """Write a coords file atomically (temporary name, then rename); ``labels``: a class
    name per tile ("" for none), when the tiles are annotated."""
    path = Path(path)
    attrs = {"schema_version": SCHEMA_VERSION, "package_version": pipeline.__version__, **attrs}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        data = f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        f.create_dataset("tissue_fraction", data=np.asarray(tissue_fraction, np.float32))
        if labels is not None:
            names = np.asarray(labels, dtype=object).astype(str).tolist()
            f.create_dataset("label", data=names, dtype=h5py.string_dtype())
        _write_attrs(f, attrs)
        own = {k: attrs[k] for k in DATASET_KEYS if k in attrs}
        _write_attrs(data, {**own, **reader_attrs(attrs)})
    return path


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def read_coords(path: str | os.PathLike) -> Coords:
    """Read a coords file written by this package, CLAM or TRIDENT."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise PipelineError(f"{path}: no 'coords' dataset; is this a coords file?")
            data = f["coords"]
            attrs = {k: _plain(v) for k, v in data.attrs.items()}
            attrs.update({k: _plain(v) for k, v in f.attrs.items()})
            coords = np.asarray(data[:], np.int64).reshape(-1, 2)
            fraction = f["tissue_fraction"][:] if "tissue_fraction" in f else None
            labels = np.asarray(f["label"].asstr()[:], dtype=str) if "label" in f else None
    except OSError as exc:
        raise PipelineError(
            f"{path}: cannot read the coords file ({exc}); rerun preprocess."
        ) from exc

    if "patch_size_level0" in attrs:  # ours and TRIDENT's
        size0 = int(attrs["patch_size_level0"])
        patch = int(attrs.get("patch_size", size0))
        mpp = attrs.get("target_mpp")
        if mpp is None and attrs.get("target_magnification"):
            mpp = 10.0 / float(attrs["target_magnification"])
    elif "patch_size" in attrs:  # CLAM: patch_size px at patch_level
        patch = int(attrs["patch_size"])
        downsample = attrs.get("downsample", [1.0, 1.0])
        downsample = downsample[0] if isinstance(downsample, list) else downsample
        size0 = round(patch * float(downsample))
        mpp = None
    else:
        raise PipelineError(
            f"{path}: coords without 'patch_size_level0' or 'patch_size' attributes; "
            "cannot tell the tile size. Rerun `cpath preprocess` on this slide."
        )
    mpp = None if mpp is None else float(mpp)
    return Coords(coords, size0, patch, mpp, fraction, attrs, labels)


def list_coords_files(source: str | os.PathLike) -> list[Path]:
    """Coords files named by ``source``: a folder of ``.h5`` files (``cpath preprocess``'s
    ``coords/``), one ``.h5`` file, or a text file listing one path per line."""
    source = Path(source)
    if source.is_dir():
        files = sorted(source.glob("*.h5"))
    elif source.suffix == ".h5" and source.is_file():
        files = [source]
    elif source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines()]
        files = [
            Path(line) if Path(line).is_absolute() else source.parent / line
            for line in lines
            if line and not line.startswith("#")
        ]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise PipelineError(
                f"{source}: listed coords files not found: {', '.join(missing[:5])}"
            )
    else:
        raise PipelineError(
            f"{source}: no such coords folder or file; run `cpath preprocess` first and pass "
            "its coords/ folder."
        )
    if not files:
        raise PipelineError(f"{source}: no coords files (*.h5); run `cpath preprocess` first.")
    return files
