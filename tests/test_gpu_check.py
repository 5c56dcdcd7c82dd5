"""``benchmarks/gpu_check.py``: measures nothing and exits 0 at once where no GPU is visible;
its pure helpers (peak FLOP/s by GPU name, MFU, the table, the DDP batch split)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_without_a_gpu_it_says_so_exits_0_at_once_and_writes_no_table(tmp_path):
    out = tmp_path / "table.md"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a GPU machine
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=tmp_path,
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU found" in done.stdout and "nothing was measured" in done.stdout
    assert "| part |" not in done.stdout  # no table
    assert seconds < 20, f"took {seconds:.1f} s"
    assert not out.exists()  # nothing measured: no table file


def test_peak_flops_by_gpu_name(gpu_check):
    assert gpu_check.peak_flops("NVIDIA H200") == 989e12
    assert gpu_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_check.peak_flops("NVIDIA GH200 480GB") == 989e12
    assert gpu_check.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_check.peak_flops("NVIDIA GeForce RTX 4090") is None


def test_resolve_peak_and_mfu(gpu_check):
    peak, text = gpu_check.resolve_peak("NVIDIA H200", None)
    assert peak == 989e12 and "989" in text
    peak, text = gpu_check.resolve_peak("Some Future GPU", None)
    assert peak is None and "--peak-tflops" in text
    peak, text = gpu_check.resolve_peak("Some Future GPU", 500.0)
    assert peak == 500e12 and "--peak-tflops" in text
    assert gpu_check.resolve_peak("NVIDIA H200", 400.0)[0] == 400e12  # the override wins
    assert gpu_check.mfu(989e12 * 0.25, 0.5, 989e12) == pytest.approx(0.5)
    assert gpu_check.mfu(1e12, 1.0, None) is None
    assert gpu_check.mfu(None, 1.0, 989e12) is None


def test_table_escapes_cells_and_marks_what_was_measured(gpu_check):
    rows = [gpu_check.Row("a", "x | y", notes="two\nlines", measured=True), gpu_check.Row("b")]
    lines = gpu_check.markdown_table(rows).splitlines()
    assert len(lines) == 4 and all(line.count(" | ") == 6 for line in lines[2:])
    assert "x \\| y" in lines[2] and "two lines" in lines[2]


def test_split_batch_gives_each_rank_its_images_in_every_view(gpu_check):
    b, n_local = 4, 3
    image = torch.arange(b)
    batch = {
        "global": image.repeat(2)[:, None] * 10 + torch.arange(2).repeat_interleave(b)[:, None],
        "local": image.repeat(n_local)[:, None],
        "masks": image.repeat(2)[:, None],
    }
    halves = [gpu_check.split_batch(batch, r, 2) for r in range(2)]
    assert halves[1]["masks"].flatten().tolist() == [2, 3, 2, 3]  # images 2, 3 of both views
    assert halves[1]["global"].flatten().tolist() == [20, 30, 21, 31]  # view-major kept
    assert halves[0]["local"].flatten().tolist() == [0, 1] * n_local
    with pytest.raises(ValueError):
        gpu_check.split_batch(batch, 0, 3)


def test_synthetic_tiles_fit_a_macenko_normalizer(gpu_check):
    from pipeline.stain.macenko import MacenkoNormalizer

    tiles = gpu_check.synthetic_he(4, 64)
    assert tiles.shape == (4, 3, 64, 64) and tiles.dtype == torch.uint8
    normalizer = MacenkoNormalizer().fit(list(tiles))
    assert normalizer(tiles).shape == tiles.shape and normalizer.passthrough == 0
