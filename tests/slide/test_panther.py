"""PANTHER slide embeddings (Song et al., CVPR 2024): the MAP-EM against a direct numpy
derivation of the reference formulas, the embedding layout, planted tasks, and the
``cpath slide-embed`` stage end to end."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.features import FeatureWriter
from pipeline.mil.planted import mixture_bags
from pipeline.slide.head import cross_validate
from pipeline.slide.panther import (
    embedding_from_params,
    embedding_length,
    fit_prototypes,
    mean_pool,
    panther_em,
    panther_embed,
    sample_tiles,
)


def numpy_map_em(x, mask, m, n_iter, tau, eps):
    """The reference's MAP-EM written out per bag and per component in float64."""
    C, d = m.shape
    out = []
    for b in range(len(x)):
        xb = x[b][mask[b] > 0]  # n x d
        pi, mu, var = np.full(C, 1.0 / C), m.copy(), np.full((C, d), eps)
        for _ in range(n_iter):
            logp = np.empty((len(xb), C))
            for k in range(C):
                logp[:, k] = np.log(pi[k]) - 0.5 * np.sum(
                    np.log(2 * np.pi * var[k]) + (xb - mu[k]) ** 2 / var[k], axis=1
                )
            q = np.exp(logp - logp.max(1, keepdims=True))
            q /= q.sum(1, keepdims=True)  # n x C
            new_pi, new_mu, new_var = np.empty(C), np.empty((C, d)), np.empty((C, d))
            for k in range(C):
                w = q[:, k].sum() + tau
                new_pi[k] = w
                new_mu[k] = (q[:, k] @ xb + tau * m[k]) / w
                new_var[k] = (q[:, k] @ xb**2 + tau * (eps + m[k] ** 2)) / w - new_mu[k] ** 2
            pi, mu, var = new_pi / new_pi.sum(), new_mu, new_var
        out.append((pi, mu, var))
    return out


@pytest.mark.parametrize(("n_iter", "tau", "eps"), [(1, 1.0, 1.0), (3, 1.0, 1.0), (2, 5.0, 0.5)])
def test_em_matches_numpy_derivation(n_iter, tau, eps):
    rng = np.random.default_rng(0)
    C, d, N, B = 3, 4, 50, 3
    m = rng.normal(0, 2, size=(C, d))
    x = rng.normal(0, 2, size=(B, N, d))
    mask = np.ones((B, N))
    mask[1, 35:] = 0  # a shorter bag, padded
    x[1, 35:] = 100.0  # padding must not count
    pi, mu, var, q = panther_em(
        torch.tensor(x), torch.tensor(m), torch.tensor(mask), n_iter=n_iter, tau=tau, eps=eps
    )
    assert pi.dtype == torch.float64
    for b, (pi_np, mu_np, var_np) in enumerate(numpy_map_em(x, mask, m, n_iter, tau, eps)):
        np.testing.assert_allclose(pi[b].numpy(), pi_np, rtol=0, atol=1e-6)
        np.testing.assert_allclose(mu[b].numpy(), mu_np, rtol=0, atol=1e-6)
        np.testing.assert_allclose(var[b].numpy(), var_np, rtol=0, atol=1e-6)
    np.testing.assert_allclose(pi.sum(1).numpy(), 1.0, atol=1e-12)
    assert torch.all(q[1, 35:] == 0)


def test_prior_and_variance_semantics():
    """Sigma is a variance, the prior pulls towards the prototypes with weight tau."""
    rng = np.random.default_rng(1)
    m = np.array([[0.0, 0.0], [50.0, 50.0]])
    tiles = np.concatenate([rng.normal(0, 3, (400, 2)), rng.normal(50, 0.5, (100, 2))])
    x = torch.tensor(tiles[None])
    pi, mu, var, _ = panther_em(x, torch.tensor(m), tau=1e-9, eps=1.0)
    np.testing.assert_allclose(pi[0].numpy(), [0.8, 0.2], atol=1e-6)  # normalised weights
    np.testing.assert_allclose(var[0, 0].numpy(), tiles[:400].var(0), rtol=1e-6)
    np.testing.assert_allclose(var[0, 1].numpy(), tiles[400:].var(0), rtol=1e-6)
    # a strong prior: mu -> prototypes, Sigma -> eps, pi -> uniform
    pi, mu, var, _ = panther_em(x, torch.tensor(m), tau=1e9, eps=2.0)
    np.testing.assert_allclose(mu[0].numpy(), m, atol=1e-5)
    np.testing.assert_allclose(var[0].numpy(), 2.0, atol=1e-4)
    np.testing.assert_allclose(pi[0].numpy(), 0.5, atol=1e-6)
    # tau = 1: exactly one pseudo-tile at the prototype
    pi, mu, var, _ = panther_em(x, torch.tensor(m), tau=1.0, eps=1.0)
    np.testing.assert_allclose(mu[0, 1].numpy(), (tiles[400:].sum(0) + m[1]) / 101, atol=1e-6)
    np.testing.assert_allclose(pi[0].numpy(), [401 / 502, 101 / 502], atol=1e-6)


def test_embedding_layout():
    C, d, B = 3, 4, 2
    pi = torch.arange(B * C, dtype=torch.float64).reshape(B, C)
    mu = 100 + torch.arange(B * C * d, dtype=torch.float64).reshape(B, C, d)
    var = 1000 + torch.arange(B * C * d, dtype=torch.float64).reshape(B, C, d)
    emb = embedding_from_params(pi, mu, var)
    assert emb.shape == (B, embedding_length(C, d)) == (B, C + 2 * C * d)
    assert torch.equal(emb[1, :C], pi[1])
    assert torch.equal(emb[1, C : C + d], mu[1, 0])  # component-major, then dimension
    assert torch.equal(emb[1, C + d : C + 2 * d], mu[1, 1])
    assert torch.equal(emb[1, C + C * d : C + C * d + d], var[1, 0])
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(n, d)) for n in (5, 9, 7)]
    protos = rng.normal(size=(C, d))
    batched = panther_embed(bags, protos, batch_size=3)
    single = np.concatenate([panther_embed([b], protos) for b in bags])
    assert batched.shape == (3, C + 2 * C * d)
    np.testing.assert_allclose(batched, single, atol=1e-6)  # padding changes nothing


def planted_scores(seed, kind):
    """Balanced accuracy of PANTHER + a linear head and of mean pooling + a linear head, 5-fold
    cross-validated on the bags of :func:`~pipeline.mil.planted.mixture_bags` (100 bags of 120
    tiles per class; the classes differ only in a component's variance or only in the
    mixture's proportions); 3 prototypes fitted on 3,000 tiles."""
    bags, labels = mixture_bags(seed, kind)
    protos = fit_prototypes(sample_tiles(bags, 3000, seed), 3, seed=seed, backend="sklearn")
    panther = cross_validate(panther_embed(bags, protos), labels, folds=5, seed=seed)
    pooled = cross_validate(mean_pool(bags), labels, folds=5, seed=seed)
    return panther["mean"]["balanced_accuracy"], pooled["mean"]["balanced_accuracy"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_variance_only(seed):
    panther, pooled = planted_scores(seed, "variance")
    print(f"variance seed {seed}: PANTHER {panther:.3f}, mean pooling {pooled:.3f}")
    assert panther >= 0.9
    assert pooled <= 0.6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_proportions(seed):
    panther, pooled = planted_scores(seed, "proportions")
    print(f"proportions seed {seed}: PANTHER {panther:.3f}, mean pooling {pooled:.3f}")
    assert panther >= 0.9
    assert pooled >= 0.9


@pytest.fixture
def feature_dir(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "feats"
    rows = []
    for i in range(16):
        label = i % 2
        n = int(rng.integers(30, 50))
        k = n // 2 if label else n // 6
        feats = np.concatenate([rng.normal(0, 1, (n - k, 8)), rng.normal(5, 1, (k, 8))])
        writer = FeatureWriter(
            root / f"s{i:02d}.h5",
            n,
            8,
            np.zeros((n, 2)),
            {"encoder": "tiny", "encoder_sha256": "abc", "slide_id": f"s{i:02d}"},
            "float32",
        )
        writer.write(feats, 0)
        writer.close()
        rows.append({"slide_id": f"s{i:02d}", "case_id": f"c{i // 2:02d}", "label": label})
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["slide_id", "case_id", "label"])
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "train.txt").write_text("\n".join(f"s{i:02d}" for i in range(10)) + "\n")
    return tmp_path


def test_cli_embed_head_and_rerun(feature_dir, caplog):
    out = feature_dir / "panther"
    args = [
        "slide-embed",
        "--features",
        str(feature_dir / "feats"),
        "--train_slides",
        str(feature_dir / "train.txt"),
        "--prototypes",
        "4",
        "--samples_per_prototype",
        "40",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    protos = np.load(out / "prototypes.npy")
    assert protos.shape == (4, 8)
    with h5py.File(out / "embeddings.h5", "r") as f:
        emb = f["embeddings"][:]
        ids = [s.decode() for s in f["slide_ids"][:]]
        attrs = dict(f.attrs)
    assert emb.shape == (16, 4 + 2 * 4 * 8)
    assert ids == [f"s{i:02d}" for i in range(16)]
    assert attrs["method"] == "panther" and attrs["C"] == 4 and attrs["d"] == 8
    assert attrs["encoder"] == "tiny" and attrs["encoder_sha256"] == "abc"
    assert json.loads(attrs["config"])["prototypes"] == 4
    assert json.loads(attrs["train_slides"]) == [f"s{i:02d}" for i in range(10)]
    np.testing.assert_allclose(emb[:, :4].sum(1), 1.0, atol=1e-5)
    assert not list(out.glob(".*.tmp"))

    stamp = (out / "embeddings.h5").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main(args) == 0
    assert (out / "embeddings.h5").stat().st_mtime_ns == stamp
    assert "skipping" in caplog.text
    assert main([*args[:-2], "--tau", "2", "--out", str(out)]) == 0  # other settings: redone
    assert (out / "embeddings.h5").stat().st_mtime_ns != stamp

    head = feature_dir / "head"
    assert (
        main(
            [
                "slide-embed",
                "--action",
                "head",
                "--embeddings",
                str(out / "embeddings.h5"),
                "--labels",
                str(feature_dir / "labels.csv"),
                "--folds",
                "4",
                "--out",
                str(head),
            ]
        )
        == 0
    )
    metrics = json.loads((head / "metrics.json").read_text())
    assert len(metrics["folds"]) == 4
    assert set(metrics["mean"]) == {"balanced_accuracy", "auc"}
    with open(head / "splits.csv") as f:
        splits = list(csv.DictReader(f))
    for k in range(4):  # grouped by patient
        tested = {(r["case_id"], r[f"fold_{k}"] == "test") for r in splits}
        assert len(tested) == len({r["case_id"] for r in splits})


def test_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["slide-embed", "--features", str(tmp_path / "empty"), "--out", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "no .h5 feature files" in err and "cpath extract" in err and "empty" in err
