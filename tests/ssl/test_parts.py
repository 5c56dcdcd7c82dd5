import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.ssl.data import StreamSampler
from pipeline.ssl.masking import batch_masks, block_mask
from pipeline.ssl.models import DINOHead, MaskedViT

TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def test_block_masks_stay_within_their_counts_and_the_masked_share_of_images():
    rng = np.random.default_rng(0)
    for count in (1, 5, 20, 32):
        mask = block_mask((8, 8), count, rng, max_block=32)
        assert 0 < mask.sum() <= count or count < 4  # blocks of at least ~4 patches
    masks = batch_masks(10, (8, 8), probability=0.5, ratio=(0.1, 0.5), rng=rng)
    per_image = masks.sum(1)
    assert (per_image > 0).sum() == 5 and per_image.max() <= 0.5 * 64


def test_stream_sampler_resumes_exactly_on_any_number_of_ranks():
    n, batch = 37, 4
    one = list(StreamSampler(n, batch, steps=20, seed=5))
    assert sorted(one[:n]) == list(range(n))  # each pass is a permutation
    # two ranks with half the batch see the same global batches
    two = [list(StreamSampler(n, batch // 2, 20, rank=r, world=2, seed=5)) for r in range(2)]
    for step in range(20):
        merged = two[0][2 * step : 2 * step + 2] + two[1][2 * step : 2 * step + 2]
        assert merged == one[batch * step : batch * (step + 1)]
    # resuming after 7 steps (28 samples) continues the same stream, here on 2 ranks
    resumed = [list(StreamSampler(n, 2, 13, rank=r, world=2, seed=5, start=28)) for r in range(2)]
    assert resumed[0][:2] + resumed[1][:2] == one[28:32]


def test_masked_vit_uses_the_mask_token_and_returns_cls_and_patches():
    torch.manual_seed(0)
    vit = MaskedViT("vit_tiny_patch16_224", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    cls, patches = vit(x)
    assert cls.shape == (2, 32) and patches.shape == (2, 16, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :4] = True
    cls_m, _ = vit(x, masks)
    assert torch.allclose(cls_m[1], cls[1], atol=1e-5) and not torch.allclose(cls_m[0], cls[0])
    small_cls, small_patches = vit(torch.randn(2, 3, 16, 16))  # local crops: fewer patches
    assert small_patches.shape == (2, 4, 32)


def test_registers_are_dropped_from_patch_tokens():
    vit = MaskedViT("vit_tiny_patch16_224", reg_tokens=4, **TINY)
    _, patches = vit(torch.randn(1, 3, 32, 32))
    assert vit.prefix == 5 and patches.shape == (1, 16, 32)


def test_dino_head_gives_cosine_similarities_at_unit_scale():
    head = DINOHead(32, prototypes=50, hidden=64, bottleneck=16)
    with torch.no_grad():
        head.last_layer.weight_v.mul_(7.0)
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 50) and out.abs().max() <= 1.0 + 1e-5


def test_unknown_architecture_is_named_with_suggestions():
    with pytest.raises(ConfigError, match="vit_smal_patch16_224.*vit_small_patch16_224"):
        MaskedViT("vit_smal_patch16_224")
