"""``cpath train-slide-encoder`` and ``cpath slide-embed --method cobra`` end to end on tiny
feature folders: training, a rerun that skips, a longer rerun that resumes, embeddings of a
model the encoder never saw, the linear head on them, and clear errors."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.features import FeatureWriter
from pipeline.slide.cobra_planted import PlantedModels

DIMS = {"a": 6, "b": 5, "new": 7}


def write_features(root, name, slide, feats, coords):
    writer = FeatureWriter(
        root / name / f"{slide.slide_id}.h5",
        len(feats),
        feats.shape[1],
        coords,
        {"encoder": f"enc-{name}", "encoder_sha256": name * 3, "slide_id": slide.slide_id},
        "float32",
    )
    writer.write(feats, 0)
    writer.close()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cobra")
    models = PlantedModels(DIMS, latent=4, types=3, seed=0)
    slides = models.slides(12, seed=1)
    rng = np.random.default_rng(0)
    for k, s in enumerate(slides):
        for name in DIMS:
            feats = models.features(name, s, k)
            order = rng.permutation(len(feats)) if name == "b" else np.arange(len(feats))
            if name == "b":
                order = order[: len(order) - 3]  # b lacks a few tiles, in another order
            write_features(root, name, s, feats[order], s.coords[order])
    with open(root / "cases.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "case_id"])
        w.writerows([s.slide_id, f"p{i // 2}"] for i, s in enumerate(slides))
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "case_id", "label"])
        w.writerows([s.slide_id, f"p{i // 2}", s.label] for i, s in enumerate(slides))
    return root


def train_args(root, epochs=2):
    return [
        "train-slide-encoder",
        "--features",
        f"[a={root / 'a'}, b={root / 'b'}]",
        "--cases",
        str(root / "cases.csv"),
        "--width",
        "8",
        "--layers",
        "1",
        "--heads",
        "2",
        "--att_dim",
        "4",
        "--d_state",
        "4",
        "--proj_dim",
        "8",
        "--batch_size",
        "4",
        "--tiles_per_view",
        "16",
        "--epochs",
        str(epochs),
        "--warmup_epochs",
        "1",
        "--checkpoint_every",
        "1",
        "--block",
        "ssm",
        "--device",
        "cpu",
        "--out",
        str(root / "enc"),
    ]


def test_train_embed_head_and_reruns(folders, caplog):
    enc = folders / "enc"
    assert main(train_args(folders)) == 0
    meta = json.loads((enc / "encoder.json").read_text())
    assert meta["inputs"]["a"]["dim"] == 6 and meta["inputs"]["b"]["encoder"] == "enc-b"
    assert meta["cases"] == 6 and meta["feature_files"] == 24
    assert (enc / "encoder.safetensors").is_file() and (enc / "config.yaml").is_file()
    assert (enc / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs
    assert not list(enc.glob(".*.tmp"))

    stamp = (enc / "encoder.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(train_args(folders)) == 0
    assert "skipping" in caplog.text
    assert (enc / "encoder.safetensors").stat().st_mtime_ns == stamp

    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(train_args(folders, epochs=3)) == 0  # longer: continues at epoch 2
    assert "resuming" in caplog.text and "at epoch 2" in caplog.text
    assert (enc / "metrics.csv").read_text().count("\n") == 4
    assert json.loads((enc / "encoder.json").read_text())["epochs"] == 3

    out = folders / "emb_new"
    embed = [
        "slide-embed",
        "--method",
        "cobra",
        "--slide_encoder",
        str(enc),
        "--features",
        str(folders / "new"),
        "--attention_features",
        str(folders / "b"),
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(embed) == 0
    with h5py.File(out / "embeddings.h5", "r") as f:
        emb = f["embeddings"][:]
        attrs = dict(f.attrs)
        ids = [s.decode() for s in f["slide_ids"][:]]
    assert emb.shape == (12, 7)  # the width of the model whose features are weighted
    assert attrs["method"] == "cobra" and attrs["d"] == 7
    assert attrs["attention_model"] == "b" and attrs["encoder"] == "enc-new"
    assert ids == sorted(ids) and len(ids) == 12
    with h5py.File(folders / "new" / f"{ids[0]}.h5", "r") as f:
        feats = f["features"][:]
    lo, hi = feats.min(0), feats.max(0)
    assert np.all(emb[0] >= lo - 1e-6) and np.all(emb[0] <= hi + 1e-6)  # a convex combination

    stamp = (out / "embeddings.h5").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(embed) == 0
    assert "skipping" in caplog.text and (out / "embeddings.h5").stat().st_mtime_ns == stamp

    own = folders / "emb_a"  # a supported model weighted by its own attention
    args = ["slide-embed", "--method", "cobra", "--slide_encoder", str(enc), "--device", "cpu"]
    assert main([*args, "--features", str(folders / "a"), "--out", str(own)]) == 0
    with h5py.File(own / "embeddings.h5", "r") as f:
        assert f["embeddings"].shape == (12, 6) and f.attrs["attention_model"] == "a"

    head = folders / "head"
    args = ["slide-embed", "--action", "head", "--embeddings", str(out / "embeddings.h5")]
    args += ["--labels", str(folders / "labels.csv"), "--folds", "3", "--out", str(head)]
    assert main(args) == 0
    metrics = json.loads((head / "metrics.json").read_text())
    assert len(metrics["folds"]) == 3 and set(metrics["mean"]) == {"balanced_accuracy", "auc"}


def test_clear_errors(folders, capsys):
    bad = [*train_args(folders)]
    bad[2] = f"[a={folders / 'a'}, nofolder]"
    assert main(bad) == 1
    assert "NAME=DIR" in capsys.readouterr().err
    args = ["slide-embed", "--method", "cobra", "--features", str(folders / "new")]
    assert main([*args, "--out", str(folders / "x")]) == 1
    assert "--slide_encoder" in capsys.readouterr().err
    assert main([*args, "--slide_encoder", str(folders / "a"), "--out", str(folders / "x")]) == 1
    err = capsys.readouterr().err
    assert "encoder.json" in err and "train-slide-encoder" in err
    main(train_args(folders))
    args += ["--slide_encoder", str(folders / "enc"), "--out", str(folders / "x")]
    assert main([*args, "--attention_model", "b"]) == 1  # new's 7 features, b takes 5
    err = capsys.readouterr().err
    assert "takes 5" in err and "--attention_features" in err
