import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.ssl.losses import (
    TeacherTargets,
    dino_loss,
    ibot_loss,
    kde_loss,
    koleo_loss,
    rankme,
    sinkhorn_knopp,
)


def test_dino_loss_is_the_mean_cross_entropy_over_distinct_view_pairs():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(4, 10, generator=g) for _ in range(3)]  # 2 global + 1 local
    teacher = [F.softmax(torch.randn(4, 10, generator=g), -1) for _ in range(2)]
    expected = []
    for ti, t in enumerate(teacher):
        for si, s in enumerate(student):
            if si != ti:
                expected.append((-(t * F.log_softmax(s / 0.1, -1)).sum(-1)).mean())
    assert dino_loss(student, teacher, 0.1).item() == pytest.approx(
        torch.stack(expected).mean().item(), rel=1e-6
    )


def test_sinkhorn_targets_are_distributions_with_equal_prototype_marginals():
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    q = sinkhorn_knopp(logits, temp=0.5, iterations=30)
    assert torch.allclose(q.sum(1), torch.ones(64), atol=1e-4)
    assert torch.allclose(q.sum(0), torch.full((16,), 64 / 16), rtol=0.05)


def test_sinkhorn_stays_finite_where_plain_exp_overflows():
    logits = torch.tensor([[0.0, 30.0], [30.0, 0.0], [30.0, 30.0]])  # exp(30 / 0.04) = inf
    assert not torch.isfinite(torch.exp(logits / 0.04)).all()
    q = sinkhorn_knopp(logits, temp=0.04)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(1), torch.ones(3), atol=1e-4)


def test_centering_moves_the_centre_towards_the_batch_mean():
    targets = TeacherTargets(3, "centering", center_momentum=0.5)
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    probs = targets(logits, temp=1.0)
    assert torch.allclose(probs, F.softmax(logits, -1))  # centre was 0 for this batch
    assert torch.allclose(targets.center, torch.tensor([[1.0, 1.0, 1.0]]))  # 0.5 * 0 + 0.5 * 2


def test_ibot_loss_weights_each_masked_image_equally_and_handles_no_mask():
    k = 5
    masks = torch.zeros(2, 8, dtype=torch.bool)
    masks[0, :1] = True  # image 0: one masked patch
    masks[1, :6] = True  # image 1: six
    student = torch.zeros(7, k)
    teacher = torch.zeros(7, k)
    teacher[0, 0] = 1.0  # image 0's patch: certain target -> loss log(k)
    teacher[1:, :] = 1.0 / k  # uniform targets -> loss log(k) as well
    assert ibot_loss(student, teacher, masks, 0.1).item() == pytest.approx(math.log(k), rel=1e-5)
    none = ibot_loss(
        torch.zeros(0, k, requires_grad=True),
        torch.zeros(0, k),
        torch.zeros(2, 8, dtype=torch.bool),
        0.1,
    )
    assert none.item() == 0.0


@pytest.mark.parametrize("loss", [koleo_loss, kde_loss])
def test_uniformity_terms_prefer_spread_embeddings_and_survive_tiny_or_duplicate_batches(loss):
    g = torch.Generator().manual_seed(2)
    spread = torch.eye(8) + 0.01 * torch.randn(8, 8, generator=g)
    clustered = torch.ones(8, 8) + 0.05 * torch.randn(8, 8, generator=g)
    assert loss(spread) < loss(clustered)
    assert loss(torch.randn(1, 8)).item() == 0.0
    dup = torch.ones(4, 8, requires_grad=True)
    value = loss(dup)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(dup.grad).all()


def test_rankme_detects_collapse():
    g = torch.Generator().manual_seed(3)
    healthy = torch.randn(256, 32, generator=g)
    collapsed = torch.randn(256, 1, generator=g) * torch.randn(1, 32, generator=g)
    assert rankme(healthy) > 25
    assert rankme(collapsed) < 1.5
