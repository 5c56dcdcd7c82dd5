"""SC-MIL's parts: the supervised contrastive loss on fixed tensors, class-aware batches and
the curriculum."""

import math

import numpy as np
import pytest
import torch

from pipeline.mil.supcon import ClassAwareBatches, curriculum_weight, supcon_loss


def by_hand(z: np.ndarray, labels: list[int], tau: float, base: float) -> float:
    """Khosla et al.'s L_out, anchor by anchor, from its definition."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    total = 0.0
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        denom = sum(math.exp(z[i] @ z[a] / tau) for a in others)
        if positives:
            terms = [math.log(math.exp(z[i] @ z[p] / tau) / denom) for p in positives]
            total += -(tau / base) * sum(terms) / len(positives)
    return total / len(z)  # anchors without positives count as 0


def test_supcon_equals_its_definition_with_and_without_positives():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 4))
    for labels in ([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 2], [0, 1, 2, 3, 4, 5]):
        for tau, base in ((0.07, 0.07), (0.5, 0.07), (1.0, 1.0)):
            got = supcon_loss(torch.tensor(z), torch.tensor(labels), tau, base)
            assert float(got) == pytest.approx(by_hand(z, labels, tau, base), rel=1e-9)
    no_positive = supcon_loss(torch.tensor(z), torch.arange(6))
    assert float(no_positive) == 0.0  # every anchor alone in its class


def test_supcon_is_lowest_when_classes_cluster_and_gives_gradients():
    labels = torch.tensor([0, 0, 1, 1])
    clustered = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    mixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    assert supcon_loss(clustered, labels) < supcon_loss(mixed, labels)
    z = mixed.clone().requires_grad_(True)
    supcon_loss(z, labels).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_class_aware_batches_hold_two_of_every_class_at_10_3_1():
    labels = [0] * 50 + [1] * 15 + [2] * 5
    batches = ClassAwareBatches(labels, size=8, per_class=2, seed=1)
    seen = list(batches)
    assert len(seen) == 70 // 8
    for batch in seen:
        assert len(batch) == 8
        counts = np.bincount(np.asarray(labels)[batch], minlength=3)
        assert (counts >= 2).all()
    assert list(ClassAwareBatches(labels, 8, 2, seed=1)) == seen  # seeded
    assert list(batches) != seen  # the next pass draws anew
    with pytest.raises(ValueError, match="at least 6"):
        ClassAwareBatches(labels, size=5)


def test_curriculum_moves_from_contrastive_to_cross_entropy():
    weights = [curriculum_weight(e, 5) for e in range(7)]
    assert weights[0] == 1.0 and weights[4] == pytest.approx(0.0, abs=1e-12)
    assert weights[2] == pytest.approx(0.5) and weights[6] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(weights, weights[1:], strict=False))
    assert curriculum_weight(0, 0) == 0.0 == curriculum_weight(3, 1)
