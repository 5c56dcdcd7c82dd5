"""Masked hard instance mining (MHIM-MIL, Tang et al., ICCV 2023): masked index sets, the
schedules, the consistency loss, the teacher's EMA update and a planted shortcut task."""

import json
import math

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError, PipelineError
from pipeline.mil.mhim import (
    cosine_schedule,
    ema_update,
    instance_scores,
    keep_mask,
    mask_count,
    masked_indices,
    soft_cross_entropy,
)
from pipeline.mil.planted import shortcut_config, write_shortcut_cohort
from pipeline.mil.train import TrainMILConfig
from pipeline.mil.training import (
    MHIM_SETTINGS,
    MILModule,
    check_teacher_run,
    init_teacher,
    train_cv,
)

# ten instances; by attention, highest first: 1, 4, 6, 2, 5, 0, 9, 7, 3, 8
ATTENTION = torch.tensor([0.05, 0.30, 0.10, 0.02, 0.25, 0.08, 0.12, 0.03, 0.01, 0.04])


def as_set(t: torch.Tensor) -> set[int]:
    return set(t.tolist())


def draws(n: int = 200, **ratios) -> list:
    return [
        masked_indices(ATTENTION, generator=torch.Generator().manual_seed(s), **ratios)
        for s in range(n)
    ]


def test_high_attention_set_is_the_most_attended():
    sets = masked_indices(ATTENTION, mask_ratio_h=0.2, mask_ratio_hr=1.0)
    assert as_set(sets.high) == {1, 4}  # ceil(10 * 0.2) = 2 highest
    assert as_set(sets.union) == {1, 4} and sets.random.numel() == sets.low.numel() == 0


def test_high_set_is_a_random_half_of_twice_as_many_top_instances():
    seen = set()
    for sets in draws(mask_ratio_h=0.2, mask_ratio_hr=0.5):
        assert sets.high.numel() == 2  # ceil(4 * 0.5) of the ceil(10 * 0.2 / 0.5) = 4 top
        assert as_set(sets.high) <= {1, 4, 6, 2}
        seen |= as_set(sets.high)
    assert seen == {1, 4, 6, 2}


def test_high_share_above_its_random_ratio_draws_from_all_instances():
    sets = draws(mask_ratio_h=0.6, mask_ratio_hr=0.5)  # 0.6 / 0.5 > 1
    assert all(s.high.numel() == 6 for s in sets)
    assert set().union(*(as_set(s.high) for s in sets)) == set(range(10))


def test_low_attention_set_is_the_least_attended():
    sets = masked_indices(ATTENTION, mask_ratio_l=0.3)
    assert as_set(sets.low) == {8, 3, 7}
    assert as_set(masked_indices(ATTENTION, mask_ratio_l=0.7).low) == {8, 3, 7, 9, 0, 5, 2}


def test_random_set_size_and_spread():
    sets = draws(mask_ratio=0.5)
    assert all(s.random.numel() == 5 for s in sets)
    counts = np.bincount(np.concatenate([s.random.numpy() for s in sets]), minlength=10)
    assert counts.min() > 60 and counts.max() < 140  # about 100 each, whatever the attention


def test_overlapping_sets_are_unioned():
    # random 5, low {8, 3, 7, 9, 0}, high {1, 4, 6}: the random set overlaps both
    sets = draws(50, mask_ratio=0.5, mask_ratio_l=0.5, mask_ratio_h=0.3, mask_ratio_hr=1.0)
    for s in sets:
        assert as_set(s.low) == {8, 3, 7, 9, 0} and as_set(s.high) == {1, 4, 6}
        assert as_set(s.union) == as_set(s.random) | as_set(s.low) | as_set(s.high)
        assert len(s.union) == 8 + len(as_set(s.random) & {2, 5})
        assert s.union.tolist() == sorted(s.union.tolist())
    # low and high overlap in a short bag: 2 highest {0, 1}, 2 lowest {1, 2}
    small = masked_indices(torch.tensor([0.5, 0.3, 0.2]), mask_ratio_l=0.5, mask_ratio_h=0.5)
    assert as_set(small.high) == {0, 1} and as_set(small.low) == {2, 1}
    assert as_set(small.union) == {0, 1, 2}


def test_mask_count_rounds_up_without_float_noise():
    assert mask_count(10, 0.7) == 7 and mask_count(10, 0.71) == 8
    assert mask_count(200, 0.01) == 2 and mask_count(5, 0.0) == 0 and mask_count(3, 1.0) == 3


def test_keep_mask_maps_padded_bags_and_spares_one_instance():
    attention = torch.zeros(2, 10)
    attention[0] = ATTENTION
    attention[1, :3] = torch.tensor([0.5, 0.3, 0.2])
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0], mask[1, :3] = True, True
    keep = keep_mask(attention, mask, mask_ratio_h=0.2, mask_ratio_hr=1.0)
    assert keep[0].nonzero().squeeze(1).tolist() == [0, 2, 3, 5, 6, 7, 8, 9]
    assert keep[1].tolist() == [False, True, True] + [False] * 7  # padding stays out
    everything = keep_mask(attention, mask, mask_ratio_l=0.5, mask_ratio_h=0.5)
    assert everything[1].sum() == 1 and not everything[1, 3:].any()  # one spared
    assert everything[0].sum() == 1


def test_mask_ratio_schedule():
    assert cosine_schedule(0.01, 0.0, 0, 100) == pytest.approx(0.01)
    assert cosine_schedule(0.01, 0.0, 25, 100) == pytest.approx(0.01 * (1 + math.sqrt(0.5)) / 2)
    assert cosine_schedule(0.01, 0.0, 50, 100) == pytest.approx(0.005)
    assert cosine_schedule(0.01, 0.0, 100, 100) == 0.0
    # the reference: final + 0.5 (base - final) (1 + cos(pi i / T)), i = 0 .. T - 1
    i = np.arange(40)
    reference = 0.0 + 0.5 * (0.01 - 0.0) * (1 + np.cos(np.pi * i / 40))
    assert np.allclose([cosine_schedule(0.01, 0.0, int(s), 40) for s in i], reference)
    # the momentum rises to 1
    assert cosine_schedule(0.9999, 1.0, 20, 40) == pytest.approx(0.99995)


def test_soft_cross_entropy_by_hand():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.1, 0.2, 0.0], [0.0, 0.0, 0.3]])

    def by_hand(s, t):
        p = [math.exp(v / 0.1) for v in t]
        p = [v / sum(p) for v in p]
        log_z = math.log(sum(math.exp(v) for v in s))
        return -sum(pi * (si - log_z) for pi, si in zip(p, s, strict=True))

    expected = (by_hand([1.0, 0.0, -1.0], [0.1, 0.2, 0.0]) + by_hand([0.0] * 3, [0, 0, 0.3])) / 2
    got = soft_cross_entropy(student, teacher, temp_s=1.0, temp_t=0.1)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the sharpened teacher, not the student, is the target
    assert soft_cross_entropy(teacher, student).item() != pytest.approx(expected, rel=1e-3)


def test_ema_update_by_hand():
    teacher, student = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[1.0, -2.0]]))
        teacher.bias.fill_(0.5)
        student.weight.copy_(torch.tensor([[3.0, 2.0]]))
        student.bias.fill_(-0.5)
    ema_update(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, torch.tensor([[1.2, -1.6]]))
    assert torch.allclose(teacher.bias, torch.tensor([0.4]))
    assert torch.allclose(student.weight, torch.tensor([[3.0, 2.0]]))  # untouched


def mhim_module(model: str = "abmil", **overrides) -> MILModule:
    settings = {k: getattr(TrainMILConfig(), f) for k, f in MHIM_SETTINGS.items()}
    settings.update({"h_decay": False, "mask_ratio_h": 0.2, **overrides})
    model_args = {"abmil": {"hidden": 16, "attn_dim": 8}, "dsmil": {"q_dim": 8}}
    return MILModule(
        model,
        8,
        2,
        model_args.get(model, {"hidden": 16}),
        "classification",
        1e-3,
        0.0,
        2,
        0.7,
        "nll",
        strategy="mhim",
        mhim=settings,
    )


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
@pytest.mark.parametrize("model", ["abmil", "transmil", "dsmil"])
def test_teacher_gets_no_gradient_and_follows_by_ema(model):
    torch.manual_seed(0)
    module = mhim_module(model, momentum=0.9)
    module.train()
    batch = {"x": torch.randn(2, 12, 8), "mask": torch.ones(2, 12, dtype=torch.bool)}
    batch["y"] = torch.tensor([0, 1])
    with torch.no_grad():  # the student moves away from the teacher
        for p in module.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    before = [p.detach().clone() for p in module.teacher.parameters()]
    module.mhim_loss(batch).backward()
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    assert all(p.grad is not None for p in module.model.parameters())
    optimiser = module.configure_optimizers()["optimizer"]
    assert sum(p.numel() for g in optimiser.param_groups for p in g["params"]) == sum(
        p.numel() for p in module.model.parameters()
    )
    module.on_train_batch_end(None, batch, 0)
    pairs = zip(module.teacher.parameters(), module.model.parameters(), strict=True)
    for old, (new, s) in zip(before, pairs, strict=True):
        assert torch.allclose(new, 0.9 * old + 0.1 * s.detach(), atol=1e-6)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_student_sees_only_the_kept_instances(monkeypatch):
    """The most attended instance (by the teacher) is left out of the student's bag."""
    torch.manual_seed(0)
    module = mhim_module(mask_ratio=0.0, mask_ratio_h=0.1, mask_ratio_hr=1.0, alpha=0.0)
    module.train()
    seen = {}
    student = module.model.forward

    def spy(x, mask, labels=None):
        seen["mask"] = mask.clone()
        return student(x, mask, labels=labels)

    monkeypatch.setattr(module.model, "forward", spy)
    teacher = module.teacher.forward
    monkeypatch.setattr(
        module.teacher,
        "forward",
        lambda x, mask, labels=None: {**teacher(x, mask), "attention": ATTENTION[None]},
    )
    batch = {"x": torch.randn(1, 10, 8), "mask": torch.ones(1, 10, dtype=torch.bool)}
    batch["y"] = torch.tensor([1])
    module.mhim_loss(batch)
    assert seen["mask"][0].tolist() == [i != 1 for i in range(10)]


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_dsmil_teacher_scores_instances_by_their_highest_class_score(monkeypatch):
    """DSMIL's teacher ranks instances by its instance classifier (the highest of the class
    scores, not the attention to the critical instance); the student's consistency loss
    compares the per-class bag vectors."""
    torch.manual_seed(0)
    module = mhim_module("dsmil", mask_ratio=0.0, mask_ratio_h=0.1, mask_ratio_hr=1.0)
    module.train()
    scores = torch.zeros(1, 10, 2)
    scores[0, 6, 1] = 5.0  # instance 6: the highest score of class 1
    scores[0, 3, 0] = 4.0  # instance 3: the highest of class 0, lower than instance 6's
    attention = torch.zeros(1, 10, 2)
    attention[0, 2] = 1.0  # the attention favours another instance, which must not matter
    out = {"instance_scores": scores, "attention": attention, "max_logits": scores.amax(1)}
    assert instance_scores(out).tolist() == scores.amax(-1).tolist()
    seen = {}
    student = module.model.forward

    def spy(x, mask, labels=None):
        seen["mask"] = mask.clone()
        seen["out"] = student(x, mask, labels=labels)
        return seen["out"]

    monkeypatch.setattr(module.model, "forward", spy)
    teacher = module.teacher.forward
    monkeypatch.setattr(
        module.teacher,
        "forward",
        lambda x, mask, labels=None: {**teacher(x, mask), "instance_scores": scores},
    )
    batch = {"x": torch.randn(1, 10, 8), "mask": torch.ones(1, 10, dtype=torch.bool)}
    batch["y"] = torch.tensor([1])
    loss = module.mhim_loss(batch)
    assert seen["mask"][0].tolist() == [i != 6 for i in range(10)]
    assert seen["out"]["embedding"].shape == (1, 2, 8)  # B x C x D
    # the loss: the task's (with DSMIL's max-instance loss) plus alpha x the soft
    # cross-entropy averaged over the classes' bag vectors
    with torch.no_grad():
        teacher_out = module.teacher(batch["x"], batch["mask"])
    hp = module.hparams.mhim
    per_class = [
        soft_cross_entropy(
            seen["out"]["embedding"][:, c],
            teacher_out["embedding"][:, c],
            hp["temp_s"],
            hp["temp_t"],
        )
        for c in range(2)
    ]
    expected = module.model_loss(seen["out"], batch) + hp["alpha"] * sum(per_class) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mhim_rejects_models_without_attention_and_foreign_teachers(tmp_path):
    with pytest.raises(ConfigError, match="mhim"):
        MILModule("mean", 8, 2, {}, "classification", 1e-3, 0.0, 2, 0.7, "nll", strategy="mhim")
    path = tmp_path / "model.ckpt"
    other = mhim_module("transmil")
    torch.save({"hyper_parameters": dict(other.hparams), "state_dict": other.state_dict()}, path)
    with pytest.raises(ConfigError, match="transmil"):
        init_teacher(mhim_module(), path)


def test_teacher_run_needs_every_fold_model_and_the_same_splits(tmp_path):
    splits = [{"slide_id": "a", "case_id": "a", "label": "0", "fold_0": "test"}]
    cfg = TrainMILConfig(strategy="mhim", teacher_init=tmp_path)
    with pytest.raises(PipelineError, match="fold_0"):
        check_teacher_run(cfg, splits, 1)
    (tmp_path / "fold_0").mkdir()
    (tmp_path / "fold_0" / "model.ckpt").write_bytes(b"")
    check_teacher_run(cfg, splits, 1)
    (tmp_path / "splits.csv").write_text("slide_id,case_id,label,fold_0\na,a,0,train\n")
    with pytest.raises(PipelineError, match="--splits"):
        check_teacher_run(cfg, splits, 1)


# ---------------------------------------------------------------------------------------
# planted task (pipeline.mil.planted.write_shortcut_cohort, 60 training and 40 test bags of
# 16 instances in 8-d): positives carry weak "hard" evidence (three instances shifted by 2)
# in every bag, and 70% of the training positives also an "easy" shortcut instance, far
# along another direction, that no test bag has. Plain ABMIL leans on the shortcut; MHIM
# masks the instances its teacher attends to most, so the student must learn the hard
# evidence.


def planted_run(root, out, seed: int, **kw) -> float:
    return train_cv(shortcut_config(root, out, seed, **kw))["pooled"]["auc"]["value"]


@pytest.fixture(scope="module")
def planted_aucs(tmp_path_factory):
    aucs = {"plain": [], "mhim": [], "roots": []}
    for seed in range(3):
        root = tmp_path_factory.mktemp(f"planted{seed}")
        write_shortcut_cohort(root, seed)
        aucs["plain"].append(planted_run(root, root / "plain", seed))
        aucs["mhim"].append(
            planted_run(root, root / "mhim", seed, strategy="mhim", teacher_init=root / "plain")
        )
        aucs["roots"].append(root)
    return aucs


def test_mhim_beats_plain_abmil_on_a_shortcut_task(planted_aucs):
    """Test AUC over 3 seeds, MHIM (the reference's ABMIL settings, teachers from the plain
    runs) at least 0.05 over plain ABMIL (about 0.70 -> 0.89 here; random masking alone,
    without the high-attention set, gains about 0.04)."""
    plain, mhim = (float(np.mean(planted_aucs[k])) for k in ("plain", "mhim"))
    assert mhim >= plain + 0.05, json.dumps({k: planted_aucs[k] for k in ("plain", "mhim")})


def test_mhim_folds_are_reused_until_a_strategy_setting_changes(planted_aucs):
    root = planted_aucs["roots"][0]
    model = root / "mhim" / "fold_0" / "model.ckpt"
    stamp = model.stat().st_mtime_ns
    mhim = {"strategy": "mhim", "teacher_init": root / "plain"}
    assert planted_run(root, root / "mhim", 0, **mhim) == planted_aucs["mhim"][0]
    assert model.stat().st_mtime_ns == stamp
    state = torch.load(model, map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("teacher.") for k in state)  # the teacher is saved with it
    planted_run(root, root / "mhim", 0, mhim_alpha=0.2, **mhim)
    assert model.stat().st_mtime_ns != stamp
