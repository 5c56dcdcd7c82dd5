"""End to end on the tiny cohort: 2-process DDP (gloo) pretraining, kill, resume, export."""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.data.demo import tile_labels
from pipeline.encoders import load_encoder
from pipeline.ssl.train import read_metrics
from pipeline.wsi.coords import write_coords

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "pretrain" / "tiny-cpu.yaml"
STEPS = 36  # killed after the first checkpoint (step 6), resumed to the end


def pretrain_cmd(coords, out, *extra):
    return [
        sys.executable,
        "-m",
        "pipeline",
        "pretrain",
        "--config",
        str(TINY),
        "--data.coords",
        str(coords),
        "--out",
        str(out),
        "--data.batch_size",
        "8",
        "--data.workers",
        "1",
        "--trainer.progress_bar",
        "false",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(out):
    return [r for r in read_metrics(out) if "loss" in r]


def logged(out, step: int) -> bool:
    """Whether the metrics of ``step`` are on disk (a killed run keeps only those)."""
    try:
        return any(int(r["step"]) >= step for r in metrics(out))
    except (OSError, ValueError, KeyError):
        return False


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_prep, tiny_cohort):
    """Two CPU processes (DDP, gloo): killed after a checkpoint, then resumed to the end;
    a kNN probe on labelled demo tiles and the slide-ID kNN run every 12 steps; tiles are
    normalised with the EXAPath preset."""
    out = tmp_path_factory.mktemp("pretrain")
    rows = tile_labels(tiny_prep / "coords", tiny_cohort, per_slide=20)
    probe = out / "probe_tiles.csv"
    with open(probe, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    ddp = [
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_steps",
        str(STEPS),
        "--trainer.ckpt_every_n_steps",
        "6",
        "--trainer.log_every_n_steps",
        "1",
        "--monitor.probe",
        str(probe),
        "--monitor.probe_every_n_steps",
        "12",
        "--monitor.slide_knn_every_n_steps",
        "12",
        "--monitor.slide_knn_slides",
        "4",
        "--monitor.slide_knn_tiles",
        "6",
        "--data.stain_norm",
        "exapath",
    ]
    cmd = pretrain_cmd(tiny_prep / "coords", out, *ddp)
    last = out / "checkpoints" / "last.ckpt"
    logs = []
    for _ in range(2):  # a start-up stuck in the gloo rendezvous is retried once on a new port
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }
        proc = subprocess.Popen(
            cmd, start_new_session=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        deadline = time.time() + 240
        while not last.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        deadline = time.time() + 30  # the rows of the steps before the checkpoint are flushed
        while proc.poll() is None and time.time() < deadline and not logged(out, 5):
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        logs.append(proc.communicate()[0].decode())
        if last.exists() or proc.returncode not in (-signal.SIGKILL, None):
            break
        for stale in out.iterdir():  # the next start begins from nothing
            if stale != probe:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    assert last.exists(), "\n---\n".join(log[-3000:] for log in logs)
    killed_step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert not (out / "encoder").exists()
    env["MASTER_PORT"] = str(free_port())
    resumed = subprocess.run(
        cmd + ["--ckpt_path", "last"], env=env, capture_output=True, text=True, timeout=400
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return {"out": out, "killed_step": killed_step, "stderr": resumed.stderr}


def test_ddp_run_resumes_with_the_same_step_count(ddp_run):
    out = ddp_run["out"]
    assert 6 <= ddp_run["killed_step"] < STEPS
    final = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == STEPS
    assert final["samples_seen"] == STEPS * 16  # 2 ranks x 8, counted across the restart
    rows = metrics(out)
    steps = [int(r["step"]) for r in rows]
    assert (
        steps[0] == 0 and max(steps) == STEPS - 1 and set(steps) == set(range(STEPS))
    )  # both runs
    assert "resuming" in ddp_run["stderr"]


def test_resume_on_another_number_of_devices(ddp_run, tiny_prep, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(ddp_run["out"], out)
    cmd = pretrain_cmd(
        tiny_prep / "coords", out, "--trainer.max_steps", str(STEPS + 6), "--ckpt_path", "last"
    )  # one process now, 8 images per step
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    final = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == STEPS + 6
    assert final["samples_seen"] == STEPS * 16 + 6 * 8


def test_loss_falls_and_rankme_does_not_collapse(ddp_run):
    rows = metrics(ddp_run["out"])
    loss = np.array([float(r["loss"]) for r in rows])
    assert loss[-4:].mean() < loss[:4].mean() - 0.05
    ranks = [r["rankme"] for r in rows if "rankme" in r]
    assert ranks and ranks[-1] > 3.0  # 16 teacher embeddings per rank; collapse gives ~1
    probes = [r["probe/knn_bacc"] for r in read_metrics(ddp_run["out"]) if "probe/knn_bacc" in r]
    assert len(probes) == 3 and all(0.0 <= p <= 1.0 for p in probes)  # steps 12, 24, 36
    collapse = [r for r in read_metrics(ddp_run["out"]) if "collapse/slide_knn_acc" in r]
    assert [int(r["step"]) for r in collapse] == [12, 24, 36]
    assert all(0.0 <= r["collapse/slide_knn_acc"] <= 1.0 for r in collapse)
    assert collapse[0]["collapse/slide_knn_chance"] == 0.25  # 4 slides x 6 tiles


def test_exported_encoder_loads_both_ways_with_identical_outputs(ddp_run):
    folder = ddp_run["out"] / "encoder"
    encoder = load_encoder(folder)
    cfg = encoder.config["export"]
    plain = timm.create_model(
        cfg["architecture"],
        pretrained=True,
        **cfg["model_args"],
        pretrained_cfg_overlay={"file": str(folder / "model.safetensors"), "num_classes": 0},
    ).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        a, b = encoder.model(x), plain(x)
    assert a.shape == (3, 192) and torch.equal(a, b)
    fresh = timm.create_model(cfg["architecture"], **cfg["model_args"]).eval()
    assert not torch.allclose(fresh(x), a)  # the weights are the trained ones


def test_export_action_reproduces_the_encoder(ddp_run, tmp_path):
    ckpt = ddp_run["out"] / "checkpoints" / "last.ckpt"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "pretrain", "export", str(ckpt), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    a = load_file(tmp_path / "encoder" / "model.safetensors")
    b = load_file(ddp_run["out"] / "encoder" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # both record the normalizer of pretraining, which `cpath extract` applies by default
    for folder in (tmp_path / "encoder", ddp_run["out"] / "encoder"):
        stain = json.loads((folder / "config.json").read_text())["stain_norm"]
        assert stain["source"] == "exapath" and stain["params"]["max_conc"] == [1.9705, 1.0308]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["--model.arch", "vit_tiny_patch17_224"],
            "unknown timm architecture 'vit_tiny_patch17_224'",
        ),
        (["--data.global_size", "256"], "larger than the tiles"),
        (["--data.coords", "EMPTY"], "zero tiles found"),
        (["--data.coords", "MISSING"], "no such coords folder"),
    ],
)
def test_bad_configs_fail_with_clear_messages(tmp_path, tiny_prep, override, message, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    write_coords(
        empty / "blank.h5",
        np.zeros((0, 2)),
        np.zeros(0),
        {
            "slide_id": "blank",
            "slide_path": "blank.svs",
            "patch_size_level0": 256,
            "patch_size": 128,
        },
    )
    override = [
        {"EMPTY": str(empty), "MISSING": str(tmp_path / "nope")}.get(o, o) for o in override
    ]
    argv = pretrain_cmd(tiny_prep / "coords", tmp_path / "run", *override)[3:]  # after -m pipeline
    assert main(argv) == 1
    assert message in capsys.readouterr().err
