"""COBRA slide encoder (Lenz et al., CVPR 2025): the MoCo v3 loss against its definition, the
attention pooling with padding, the aggregation of another model's features by coordinates,
the sequence block's masking and the checkpointed training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.slide.cobra import (
    Cobra,
    MoCoCobra,
    StateSpaceBlock,
    aggregate,
    embed_views,
    match_coords,
    moco_v3_loss,
    sort_yx,
)


def test_moco_v3_loss_matches_definition():
    """2 tau CE(q k^T / tau, arange), rows = queries; inputs not unit-length and not
    symmetric, so a missing normalisation, factor or transposition shows."""
    q = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    k = torch.tensor([[2.0, 0.5], [-1.0, 4.0], [-1.0, -3.0]])
    tau = 0.2
    qn = [[x / math.hypot(*row) for x in row] for row in q.tolist()]
    kn = [[x / math.hypot(*row) for x in row] for row in k.tolist()]
    ce = 0.0
    for i in range(3):
        s = [sum(a * b for a, b in zip(qn[i], kn[j], strict=True)) / tau for j in range(3)]
        ce += -(s[i] - math.log(sum(math.exp(v) for v in s)))
    expected = 2 * tau * ce / 3
    assert moco_v3_loss(q, k, tau).item() == pytest.approx(expected, rel=1e-6)
    assert moco_v3_loss(k, q, tau).item() != pytest.approx(expected, rel=1e-3)  # rows: queries
    assert moco_v3_loss(q, q, tau).item() < moco_v3_loss(q, k, tau).item()  # aligned: lower


def tiny_cobra(dims=None, layers=1, heads=4):
    torch.manual_seed(0)
    return Cobra(
        dims or {"a": 6, "b": 5},
        width=16,
        layers=layers,
        heads=heads,
        att_dim=8,
        d_state=4,
        proj_dim=8,
        dropout=0.0,
    ).eval()


def test_attention_sums_to_one_and_ignores_padding():
    model = tiny_cobra()
    x_a, x_b = torch.randn(7, 6), torch.randn(4, 5)
    h, mask = embed_views(model, [("a", x_a), ("b", x_b)])  # 2 x 7 x 16
    assert h.shape == (2, 7, 16) and mask.tolist()[1] == [True] * 4 + [False] * 3
    out = model.encode(h, mask)
    torch.testing.assert_close(out["attention"].sum(1), torch.ones(2))
    torch.testing.assert_close(out["head_attention"].sum(-1), torch.ones(2, 4))
    assert torch.all(out["attention"][1, 4:] == 0)
    assert torch.all(out["head_attention"][1, :, 4:] == 0)
    alone = model("b", x_b[None], torch.ones(1, 4, dtype=torch.bool))  # no padding at all
    torch.testing.assert_close(alone["attention"][0], out["attention"][1, :4])
    torch.testing.assert_close(alone["embedding"][0], out["embedding"][1])
    h[1, 4:] = 1e3  # whatever sits in the padding
    torch.testing.assert_close(model.encode(h, mask)["embedding"][1], out["embedding"][1])


def test_heads_average_logits_before_one_softmax():
    model = tiny_cobra(layers=0)
    h = torch.randn(1, 5, 16)
    mask = torch.ones(1, 5, dtype=torch.bool)
    out = model.encode(h, mask)
    hn = model.norm(h)
    logits = []
    for j, c in enumerate(hn.chunk(4, dim=-1)):
        a = torch.tanh(model.attn.v[j](c)) * torch.sigmoid(model.attn.u[j](c))
        logits.append(model.attn.w[j](a)[..., 0])  # 1 x 5
    expected = torch.softmax(torch.stack(logits).mean(0), dim=-1)  # 1 x 5
    torch.testing.assert_close(out["attention"], expected)
    torch.testing.assert_close(out["embedding"], (expected[..., None] * hn).sum(1))


def test_state_space_block_masks_padding_both_ways():
    torch.manual_seed(0)
    block = StateSpaceBlock(8, d_state=4)
    x = torch.randn(1, 6, 8)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    y = block(x, mask)
    x2 = x.clone()
    x2[0, 4:] = 100.0
    torch.testing.assert_close(block(x2, mask)[0, :4], y[0, :4])
    torch.testing.assert_close(block(x[:, :4], mask[:, :4])[0], y[0, :4])
    x3 = x.clone()
    x3[0, 3] += torch.randn(8)  # the last valid tile reaches the first one (backward pass)
    assert not torch.allclose(block(x3, mask)[0, 0], y[0, 0])


def test_sort_and_match_coords():
    coords = np.array([[512, 0], [0, 256], [256, 0], [0, 0]])
    assert sort_yx(coords).tolist() == [3, 2, 0, 1]
    other = np.array([[0, 256], [256, 0], [768, 768]])
    i, j = match_coords(coords, other)
    assert i.tolist() == [1, 2] and j.tolist() == [0, 1]


def test_aggregate_other_model_by_coords():
    """Model A's attention weights model B's tiles, which come in another order and miss
    one of A's tiles (and have one A lacks): the matched weights are renormalised."""
    coords_a = np.array([[0, 0], [256, 0], [0, 256], [256, 256]])
    attention = np.array([0.1, 0.2, 0.3, 0.4])
    coords_b = np.array([[256, 256], [999, 999], [0, 0], [256, 0]])  # (0, 256) missing
    feats_b = np.array([[1.0, 0.0, 2.0], [50.0, 50.0, 50.0], [0.0, 1.0, 0.0], [3.0, 3.0, 3.0]])
    # matched: (0,0) 0.1 -> [0,1,0]; (256,0) 0.2 -> [3,3,3]; (256,256) 0.4 -> [1,0,2]
    expected = 0.1 * np.array([0, 1, 0]) + 0.2 * np.array([3, 3, 3]) + 0.4 * np.array([1, 0, 2])
    expected /= 0.7
    out = aggregate(attention, coords_a, feats_b, coords_b)
    assert out.shape == (3,)
    np.testing.assert_allclose(out, expected, atol=1e-12)
    with pytest.raises(ValueError, match="no tile coordinates"):
        aggregate(attention, coords_a, feats_b, coords_b + 1)


def test_encoder_output_dim_is_the_aggregated_models():
    """The slide embedding takes the width of whichever model's features it weights."""
    model = tiny_cobra()
    rng = np.random.default_rng(0)
    coords = np.stack([np.arange(9) % 3, np.arange(9) // 3], 1) * 256
    order = sort_yx(coords)
    with torch.no_grad():
        out = model(
            "a",
            torch.tensor(rng.normal(size=(1, 9, 6)), dtype=torch.float32),
            torch.ones(1, 9, dtype=torch.bool),
        )
    feats_new = rng.normal(size=(9, 11))  # an 11-wide model the encoder never saw
    emb = aggregate(out["attention"][0].numpy(), coords[order], feats_new, coords)
    assert emb.shape == (11,)


def test_momentum_update_and_training_step():
    enc = tiny_cobra()
    enc.train()
    model = MoCoCobra(enc, tau=0.2, dropout=0.0)
    before = [p.clone() for p in model.momentum.parameters()]
    views1 = [("a", torch.randn(5, 6)), ("b", torch.randn(3, 5)), ("a", torch.randn(4, 6))]
    views2 = [("b", torch.randn(4, 5)), ("a", torch.randn(6, 6)), ("b", torch.randn(2, 5))]
    loss = model(views1, views2, m=0.9)
    loss.backward()
    assert loss.item() > 0 and all(p.grad is None for p in model.momentum.parameters())
    for b, p, o in zip(before, model.momentum.parameters(), model.online.parameters(), strict=True):
        torch.testing.assert_close(p, 0.9 * b + 0.1 * o)


def test_attention_input_by_encoder_name_then_width(tmp_path):
    from pipeline.errors import ConfigError
    from pipeline.slide.embed import attention_input

    meta = {
        "inputs": {
            "uni": {"dim": 8, "encoder": "uni"},
            "conch": {"dim": 8, "encoder": "conch"},
            "x": {"dim": 5},
        }
    }
    assert attention_input(meta, None, {"encoder": "conch"}, 8, tmp_path) == "conch"
    assert attention_input(meta, None, {}, 5, tmp_path) == "x"
    assert attention_input(meta, "uni", {}, 8, tmp_path) == "uni"
    with pytest.raises(ConfigError, match="--attention_model"):
        attention_input(meta, None, {"encoder": "another"}, 8, tmp_path)  # same width only
    with pytest.raises(ConfigError, match="--attention_model"):
        attention_input(meta, None, {}, 8, tmp_path)  # two inputs of that width
    with pytest.raises(ConfigError, match="takes 8"):
        attention_input(meta, "uni", {}, 5, tmp_path)


@pytest.mark.parametrize("name", ["cobra.yaml", "cobra-tiny-cpu.yaml"])
def test_configs_load(name):
    from pathlib import Path

    from pipeline.config import load_config
    from pipeline.slide.cobra_train import TrainSlideEncoderConfig

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(TrainSlideEncoderConfig, root / "configs" / "slide" / name)
    assert cfg.tau == 0.2 and cfg.width % cfg.heads == 0
