import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from pipeline.errors import ConfigError
from pipeline.mil.base import load_models, make_mil

MODELS = sorted(load_models())
SMALL = {
    "abmil": {"hidden": 32, "attn_dim": 16},
    "clam_sb": {"hidden": 32, "attn_dim": 16},
    "clam_mb": {"hidden": 32, "attn_dim": 16},
    "transmil": {"hidden": 32, "heads": 4, "landmarks": 8},
    "dsmil": {"q_dim": 16},
    "mean": {"hidden": 32},
    "max": {"hidden": 32},
}
D, C = 24, 3


def model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return make_mil(name, D, C, **SMALL[name]).eval()


def test_every_aggregator_is_registered():
    assert set(MODELS) == {"abmil", "clam_sb", "clam_mb", "transmil", "dsmil", "mean", "max"}
    with pytest.raises(ConfigError, match="unknown MIL model 'abmill'"):
        make_mil("abmill", D, C)
    with pytest.raises(ConfigError, match="abmil"):
        make_mil("abmil", D, C, hiden=3)


@pytest.mark.parametrize("name", MODELS)
def test_padding_is_ignored_and_outputs_are_finite(name):
    m = model(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, D, generator=g)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 25:] = False  # bag 1 has 25 instances
    noisy = x.clone()
    noisy[1, 25:] = 1e3 * torch.randn(15, D, generator=g)  # garbage in the padding
    with torch.no_grad():
        a, b = m(x, mask), m(noisy, mask)
    assert a["logits"].shape == (2, C) and torch.isfinite(a["logits"]).all()
    assert torch.allclose(a["logits"], b["logits"], atol=1e-5)
    if "attention" in a:
        att = a["attention"]
        assert att.shape[:2] == (2, 40) and (att[1, 25:] == 0).all()
    if name != "transmil":  # TransMIL's Nystrom landmarks depend on the padded length
        with torch.no_grad():
            alone = m(x[1:, :25], mask[1:, :25])["logits"]
        assert torch.allclose(alone, a["logits"][1:], atol=1e-5)


def test_transmil_lays_each_bag_on_its_own_grid():
    """A bag's TransMIL output is the same alone as beside a longer bag in a padded batch
    (exact attention: at most four times the landmark count of tokens)."""
    torch.manual_seed(0)
    m = make_mil("transmil", D, C, hidden=32, heads=4, landmarks=16).eval()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(7, D, generator=g), torch.randn(40, D, generator=g)  # grids 3x3, 7x7
    x = 1e3 * torch.randn(2, 40, D, generator=g)  # garbage in the padding
    x[0, :7], x[1] = a, b
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, :7], mask[1] = True, True
    with torch.no_grad():
        alone = m(a[None], torch.ones(1, 7, dtype=torch.bool))
        batch = m(x, mask)
        last = m(b[None], torch.ones(1, 40, dtype=torch.bool))
    assert torch.allclose(alone["logits"], batch["logits"][:1], atol=1e-5)
    assert torch.allclose(last["logits"], batch["logits"][1:], atol=1e-5)
    assert torch.allclose(alone["attention"], batch["attention"][:1, :7], atol=1e-6)
    assert (batch["attention"][0, 7:] == 0).all()
    # the grid is filled with the bag's first instances again, as the reference does
    with torch.no_grad():
        nine = m(torch.cat([a, a[:2]])[None], torch.ones(1, 9, dtype=torch.bool))["logits"]
    assert torch.allclose(alone["logits"], nine, atol=1e-5)


@pytest.mark.parametrize("name", ["abmil", "clam_sb", "mean", "max", "dsmil"])
def test_order_of_instances_does_not_matter(name):
    m = model(name)
    x = torch.randn(1, 30, D)
    mask = torch.ones(1, 30, dtype=torch.bool)
    perm = torch.randperm(30)
    with torch.no_grad():
        assert torch.allclose(m(x, mask)["logits"], m(x[:, perm], mask)["logits"], atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_empty_bags_and_gradients(name):
    m = model(name).train()
    x = torch.randn(2, 12, D, requires_grad=True)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0] = False  # an empty bag in the batch
    out = m(x, mask, labels=torch.tensor([0, 2]))
    loss = out["logits"].sum() + out.get("aux_loss", 0.0)
    loss.backward()
    assert torch.isfinite(out["logits"]).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["abmil", "clam_sb"])
def test_attention_is_a_distribution_over_real_instances(name):
    m = model(name)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[2, 5:] = False
    with torch.no_grad():
        att = m(torch.randn(3, 20, D), mask)["attention"]
    assert torch.allclose(att.sum(1), torch.ones(3), atol=1e-5)


def test_clam_instance_loss_uses_top_and_bottom_instances():
    for name, subtyping in (("clam_sb", False), ("clam_mb", True)):
        m = make_mil(name, D, C, hidden=32, attn_dim=16, k_sample=4, subtyping=subtyping).train()
        out = m(
            torch.randn(2, 30, D), torch.ones(2, 30, dtype=torch.bool), labels=torch.tensor([1, 0])
        )
        assert out["aux_loss"].ndim == 0 and out["aux_loss"] > 0
        # bags smaller than 2 instances have nothing to pseudo-label: zero, not an error
        tiny = m(torch.randn(1, 1, D), torch.ones(1, 1, dtype=torch.bool), labels=torch.tensor([0]))
        assert tiny["aux_loss"] == 0


@pytest.mark.parametrize("name", MODELS)
def test_each_aggregator_learns_a_witness_instance_task(name):
    """Positive bags hold a few instances shifted along one direction (the 'tumour' tiles);
    after a few epochs every model ranks held-out bags with AUC >= 0.95."""
    g = torch.Generator().manual_seed(0)
    n_bags, n = 700, 16
    x = torch.randn(n_bags, n, D, generator=g)
    y = torch.arange(n_bags) % 2
    direction = torch.randn(D, generator=g)
    for i in torch.nonzero(y).flatten():
        k = int(torch.randint(2, 5, (1,), generator=g))
        x[i, torch.randperm(n, generator=g)[:k]] += 3 * direction / direction.norm()
    mask = torch.ones(n_bags, n, dtype=torch.bool)
    test = slice(500, None)  # trained on the first 500 bags
    torch.manual_seed(0)
    m = make_mil(name, D, 2, **SMALL[name]).train()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    for _ in range(4):  # epochs of 63 batches of 8 bags
        for b in range(0, 500, 8):
            out = m(x[b : b + 8], mask[b : b + 8], labels=y[b : b + 8])
            loss = F.cross_entropy(out["logits"], y[b : b + 8]) + out.get("aux_loss", 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
    m.eval()
    with torch.no_grad():
        scores = torch.softmax(m(x[test], mask[test])["logits"], -1)[:, 1]
    assert roc_auc_score(y[test].numpy(), scores.numpy()) >= 0.95
