"""SC-MIL as a strategy of train-mil (Juyal et al., WACV 2024): the curriculum-weighted loss,
class-aware training batches, the configuration checks, fold reuse and a planted imbalanced
three-class task."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.mil.bags import open_bag_store
from pipeline.mil.planted import IMBALANCED_ARMS, imbalanced_config, write_imbalanced_cohort
from pipeline.mil.supcon import supcon_loss
from pipeline.mil.train import TrainMILConfig
from pipeline.mil.training import (
    SUPCON_SETTINGS,
    MILModule,
    Targets,
    bag_loader,
    check_supcon,
    predict_logits,
    supcon_settings,
    train_cv,
)


def supcon_module(model: str = "abmil", curriculum_epochs: int = 5, **overrides) -> MILModule:
    settings = {k: getattr(TrainMILConfig(), f) for k, f in SUPCON_SETTINGS.items()}
    settings.update({"curriculum_epochs": curriculum_epochs, **overrides})
    model_args = {"hidden": 16, "attn_dim": 8} if model == "abmil" else {"hidden": 16}
    return MILModule(
        model,
        8,
        3,
        model_args,
        "classification",
        1e-3,
        0.0,
        10,
        0.7,
        "nll",
        strategy="supcon",
        supcon=settings,
    )


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
@pytest.mark.parametrize(("epoch", "weight"), [(0, 1.0), (2, 0.5), (4, 0.0), (7, 0.0)])
def test_loss_is_the_curriculum_weighted_sum_of_supcon_and_cross_entropy(
    monkeypatch, epoch, weight
):
    torch.manual_seed(0)
    module = supcon_module(curriculum_epochs=5, temperature=0.1)
    module.eval()  # no dropout: the same outputs in the step and by hand
    monkeypatch.setattr(MILModule, "current_epoch", property(lambda self: epoch))
    batch = {"x": torch.randn(6, 10, 8), "mask": torch.ones(6, 10, dtype=torch.bool)}
    batch["mask"][:, 7:] = False  # padded bags
    batch["y"] = torch.tensor([0, 0, 1, 1, 2, 2])
    out = module(batch["x"], batch["mask"])
    contrastive = supcon_loss(module.projection(out["embedding"]), batch["y"], 0.1, 0.1)
    ce = F.cross_entropy(out["logits"], batch["y"])
    assert module.supcon_weight() == pytest.approx(weight)
    got = module.scmil_loss(batch)
    assert got.item() == pytest.approx((weight * contrastive + (1 - weight) * ce).item(), rel=1e-5)
    assert contrastive.item() != pytest.approx(ce.item(), rel=1e-2)  # the terms differ


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_projection_head_is_trained_with_the_model_and_left_out_of_prediction():
    torch.manual_seed(0)
    module = supcon_module(curriculum_epochs=5)
    assert module.projection.net[-1].out_features == 128  # Khosla et al.'s projection size
    params = module.configure_optimizers()["optimizer"].param_groups[0]["params"]
    assert {id(p) for p in module.projection.parameters()} <= {id(p) for p in params}
    batch = {"x": torch.randn(4, 6, 8), "mask": torch.ones(4, 6, dtype=torch.bool)}
    batch["y"] = torch.tensor([0, 0, 1, 1])
    module.train()
    module.scmil_loss(batch).backward()
    assert all(p.grad is not None for p in module.projection.parameters())
    # prediction: the model's logits, whatever the projection head holds
    module.eval()
    before = module(batch["x"], batch["mask"])["logits"]
    with torch.no_grad():
        for p in module.projection.parameters():
            p.add_(1.0)
    assert torch.equal(module(batch["x"], batch["mask"])["logits"], before)


def test_supcon_is_refused_where_it_cannot_run():
    with pytest.raises(ConfigError, match="classification"):
        check_supcon(TrainMILConfig(strategy="supcon", task="survival"))
    for model in ("mean", "clam_mb", "dsmil"):
        with pytest.raises(ConfigError, match="bag embedding"):
            check_supcon(TrainMILConfig(strategy="supcon", model=model))
    with pytest.raises(ConfigError, match="at least 6"):
        check_supcon(TrainMILConfig(strategy="supcon", supcon_batch_size=4), n_classes=3)
    with pytest.raises(ConfigError, match="supcon_temperature"):
        check_supcon(TrainMILConfig(strategy="supcon", supcon_temperature=0.0))
    with pytest.raises(ConfigError, match="supcon"):
        MILModule("mean", 8, 2, {}, "classification", 1e-3, 0.0, 2, 0.7, "nll", strategy="supcon")
    assert supcon_module("transmil", curriculum_epochs=2).projection is not None
    with pytest.raises(ConfigError, match="supcon"):
        MILModule("abmil", 8, 4, {}, "survival", 1e-3, 0.0, 2, 0.7, "nll", strategy="supcon")


def test_curriculum_defaults_to_half_the_epochs():
    assert supcon_settings(TrainMILConfig(epochs=30))["curriculum_epochs"] == 15
    cfg = TrainMILConfig(epochs=30, supcon_curriculum_epochs=4)
    assert supcon_settings(cfg)["curriculum_epochs"] == 4


# ---------------------------------------------------------------------------------------
# planted task (pipeline.mil.planted.write_imbalanced_cohort): three classes at 10:3:1 among
# the training bags (100, 30, 10), a balanced test set (20 each); a bag of class c has weak
# evidence: three of its 16 instances shifted by 2 along direction c. Every arm has the same
# optimisation (imbalanced_config): 40 epochs of 8 steps of 16 bags.

D, BAG, TEST = 8, 16, 20


def planted_run(root, arm: str, seed: int, **kw) -> float:
    cfg = imbalanced_config(root, root / arm, seed, **IMBALANCED_ARMS[arm], **kw)
    return train_cv(cfg)["pooled"]["balanced_accuracy"]["value"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    scores: dict = {arm: [] for arm in IMBALANCED_ARMS}
    roots = []
    for seed in range(3):
        root = tmp_path_factory.mktemp(f"imbalanced{seed}")
        write_imbalanced_cohort(root, seed, n_test=TEST, bag=BAG, dim=D)
        for arm in IMBALANCED_ARMS:
            scores[arm].append(planted_run(root, arm, seed))
        roots.append(root)
    return {"scores": scores, "roots": roots}


def test_supcon_beats_plain_cross_entropy_on_an_imbalanced_task(planted):
    """Balanced accuracy on the balanced test set, mean of 3 seeds: SC-MIL (with a
    class-weighted cross-entropy term) 0.805, class-weighted cross-entropy 0.761, plain
    cross-entropy 0.683 here; seeds 3-5: 0.833, 0.794, 0.644. Without the class weights in
    its cross-entropy term SC-MIL scores 0.789 and 0.778 there: above plain cross-entropy,
    but not always above class-weighted cross-entropy."""
    mean = {arm: float(np.mean(v)) for arm, v in planted["scores"].items()}
    figures = json.dumps(planted["scores"])
    assert mean["supcon"] >= mean["plain"] + 0.05, figures
    assert mean["supcon"] >= mean["weighted"], figures


def test_supcon_run_predicts_with_the_model_and_saves_the_head(planted):
    root = planted["roots"][0]
    with open(root / "supcon" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * TEST and {r["label"] for r in rows} == {"k0", "k1", "k2"}
    probs = np.array([[float(r[f"prob_k{c}"]) for c in range(3)] for r in rows])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    module = MILModule.load_from_checkpoint(
        root / "supcon" / "fold_0" / "model.ckpt", map_location="cpu"
    )
    assert module.projection is not None and module.hparams.strategy == "supcon"
    store = open_bag_store(root / "feats", [r["slide_id"] for r in rows], "memory")
    logits = predict_logits(module, [r["slide_id"] for r in rows], store)  # N x 3
    assert np.allclose(torch.softmax(logits, -1).numpy(), probs, atol=1e-4)
    # the logged terms follow the curriculum (20 epochs of contrastive share, then none)
    with open(root / "supcon" / "fold_0" / "metrics.csv", newline="") as f:
        logged = [r for r in csv.DictReader(f) if r.get("train_supcon_weight")]
    weights = [float(r["train_supcon_weight"]) for r in logged]
    assert weights[0] == pytest.approx(1.0) and weights[19:] == pytest.approx([0.0] * 21)
    assert all(r["train_supcon"] and r["train_ce"] for r in logged)


def test_supcon_training_batches_hold_two_bags_of_every_class(planted):
    root = planted["roots"][0]
    cfg = imbalanced_config(root, root / "supcon", 0, strategy="supcon")
    with open(root / "splits.csv", newline="") as f:
        split = list(csv.DictReader(f))
    train = [r["slide_id"] for r in split if r["fold_0"] == "train"]
    targets = Targets(split, "classification", ["k0", "k1", "k2"], 4)
    store = open_bag_store(root / "feats", train, "memory")
    loader = bag_loader(train, store, targets, cfg, True, torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(batches) == len(train) // 16
    for batch in batches:
        assert batch["x"].shape == (16, BAG, D) and batch["mask"].all()
        assert np.bincount(batch["y"].numpy(), minlength=3).min() >= 2
    assert [b["ids"] for b in batches] != [b["ids"] for b in loader]  # each pass draws anew


def test_supcon_folds_are_reused_until_a_supcon_setting_changes(planted):
    root = planted["roots"][0]
    model = root / "supcon" / "fold_0" / "model.ckpt"
    stamp = model.stat().st_mtime_ns
    assert planted_run(root, "supcon", 0) == planted["scores"]["supcon"][0]
    assert model.stat().st_mtime_ns == stamp
    planted_run(root, "supcon", 0, supcon_temperature=0.1)
    assert model.stat().st_mtime_ns != stamp
