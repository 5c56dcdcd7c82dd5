"""The coords file: one HDF5 file per slide listing its tiles.

Schema (``schema_version`` 1)::

    coords           int64   N x 2   level-0 top-left (x, y) of each tile
    tissue_fraction  float32 N       tissue share of each tile (0-1)
    attrs: schema_version, target_mpp, level0_mpp, mpp_source, patch_size (px at
           target_mpp), patch_size_level0, patch_level (pyramid level to read from),
           overlap, min_tissue, tissue_method, tissue_params (JSON), slide_path,
           slide_id, level0_width, level0_height, package_version

``patch_size`` + ``patch_level`` follow the CLAM convention when the target mpp is that
of a pyramid level (e.g. 0.5-mpp tiles of a 20x slide); ``patch_size_level0`` is always
exact. :func:`read_coords` also reads the coords files that CLAM (``patch_level``,
``patch_size`` at that level, ``downsample``) and TRIDENT (``patch_size_level0``,
``target_magnification``) write.
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

    def __len__(self) -> int:
        return len(self.coords)

    @property
    def slide_path(self) -> str | None:
        return self.attrs.get("slide_path")


def write_coords(path: str | os.PathLike, coords: np.ndarray, tissue_fraction: np.ndarray,
                 attrs: dict) -> Path:  # fmt: skip
    """Write a coords file atomically (temporary name, then rename)."""
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        f.create_dataset("tissue_fraction", data=np.asarray(tissue_fraction, np.float32))
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["package_version"] = pipeline.__version__
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if isinstance(value, dict) else value
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
    return Coords(coords, size0, patch, None if mpp is None else float(mpp), fraction, attrs)


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
        files = [Path(line) if Path(line).is_absolute() else source.parent / line
                 for line in lines if line and not line.startswith("#")]  # fmt: skip
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
