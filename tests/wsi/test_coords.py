import json

import h5py
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.wsi.coords import read_coords, write_coords


def test_round_trip(tmp_path):
    coords = np.array([[0, 0], [512, 1024]])
    attrs = {
        "target_mpp": 0.5,
        "patch_size": 256,
        "patch_size_level0": 512,
        "patch_level": 0,
        "tissue_params": {"mpp": 8.0},
    }
    path = write_coords(tmp_path / "a.h5", coords, np.array([1.0, 0.6]), attrs)
    table = read_coords(path)
    np.testing.assert_array_equal(table.coords, coords)
    assert table.coords.dtype == np.int64 and table.tissue_fraction.dtype == np.float32
    assert (table.patch_size, table.patch_size_level0, table.target_mpp) == (256, 512, 0.5)
    assert table.attrs["schema_version"] == 1 and table.attrs["tissue_params"] == '{"mpp": 8.0}'
    assert not list(tmp_path.glob("*.tmp"))


def test_reads_clam_coords(tmp_path):
    """CLAM: attrs on the coords dataset, patch_size at patch_level, downsample per level."""
    with h5py.File(tmp_path / "clam.h5", "w") as f:
        d = f.create_dataset("coords", data=np.array([[100, 200], [612, 200]], np.int64))
        d.attrs.update(
            {
                "patch_level": 1,
                "patch_size": 256,
                "downsample": np.array([4.0, 4.0]),
                "level_dim": np.array([1000, 800]),
                "name": "slide_x",
            }
        )
    table = read_coords(tmp_path / "clam.h5")
    assert (table.patch_size, table.patch_size_level0, table.target_mpp) == (256, 1024, None)
    assert table.attrs["name"] == "slide_x" and len(table) == 2


def test_reads_trident_coords(tmp_path):
    """TRIDENT: patch_size (target px), patch_size_level0, target_magnification."""
    with h5py.File(tmp_path / "trident.h5", "w") as f:
        d = f.create_dataset("coords", data=np.zeros((3, 2), np.int64))
        d.attrs.update(
            {
                "patch_size": 512,
                "patch_size_level0": 1024,
                "target_magnification": 20,
                "level0_magnification": 40,
                "overlap": 0,
                "name": "s",
            }
        )
    table = read_coords(tmp_path / "trident.h5")
    assert (table.patch_size, table.patch_size_level0, table.target_mpp) == (512, 1024, 0.5)


def test_not_a_coords_file(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="cannot read the coords file"):
        read_coords(tmp_path / "x.h5")
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f.create_dataset("features", data=np.zeros(3))
    with pytest.raises(PipelineError, match="no 'coords' dataset"):
        read_coords(tmp_path / "y.h5")


def test_attributes_have_the_types_h5py_gives_them(tmp_path):
    """The fast attribute writer stores what ``obj.attrs[key] = value`` stores: same HDF5
    types, shapes and values read back (strings as UTF-8, dicts as JSON)."""
    from pipeline.wsi.coords import _write_attrs

    values = {
        "text": "héllo, slide",
        "empty": "",
        "int": 3,
        "float": 0.25,
        "bool": True,
        "numpy_bool": np.bool_(False),
        "numpy_int": np.int64(7),
        "numpy_float32": np.float32(2.5),
        "ints": np.array([30000, 20000], np.int64),
        "floats": np.array([4.0, 4.0]),
        "dict": {"a": 1, "b": [1, 2]},
    }
    with h5py.File(tmp_path / "a.h5", "w") as f:
        _write_attrs(f.create_group("fast"), values)
        slow = f.create_group("slow")
        for key, value in values.items():
            slow.attrs[key] = json.dumps(value) if isinstance(value, dict) else value
    with h5py.File(tmp_path / "a.h5") as f:
        for key in values:
            fast, slow = f["fast"].attrs.get_id(key), f["slow"].attrs.get_id(key)
            assert fast.get_type().equal(slow.get_type()), key
            assert fast.shape == slow.shape, key
            np.testing.assert_array_equal(f["fast"].attrs[key], f["slow"].attrs[key])
            assert type(f["fast"].attrs[key]) is type(f["slow"].attrs[key]), key
