"""The DINOv2 LightningModule: which parameters train under which losses."""

import pytest
import torch


def tiny_batch(images: int = 2, masked: bool = True) -> dict[str, torch.Tensor]:
    """A collated batch of 16 px global and 8 px local views (2 x 2 patch grid)."""
    masks = torch.zeros(2 * images, 4, dtype=torch.bool)
    if masked:
        masks[0, :2] = True
    return {
        "global": torch.randn(2 * images, 3, 16, 16),  # 2B x 3 x G x G
        "local": torch.randn(2 * images, 3, 8, 8),  # nB x 3 x L x L
        "masks": masks,
    }


@pytest.mark.parametrize(
    ("loss", "separate_ibot_head"),
    [
        ({"ibot_weight": 0.0}, False),
        ({"ibot_weight": 0.0}, True),
        ({"ibot_weight": 1.0}, True),
        ({"ibot_weight": 1.0, "dino_weight": 0.0}, True),
        ({"mask_probability": 0.0}, True),
    ],
)
def test_every_trainable_parameter_gets_a_gradient(tiny_module, loss, separate_ibot_head):
    """DDP (``find_unused_parameters=False``) fails on a trainable parameter without one."""
    torch.manual_seed(0)
    module = tiny_module(loss=loss, model={"separate_ibot_head": separate_ibot_head})
    terms, _, _ = module.ssl_losses(tiny_batch(), teacher_temp=0.04)
    sum(terms.values()).backward()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("student.") for n in trainable)
    assert [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None] == []
    ibot = loss.get("ibot_weight", 1.0) > 0 and loss.get("mask_probability", 0.5) > 0
    assert module.student.backbone.mask_token.requires_grad == ibot


def test_frozen_parameters_are_kept_in_the_state_dict(tiny_module):
    on = tiny_module(model={"separate_ibot_head": True})
    off = tiny_module(loss={"ibot_weight": 0.0}, model={"separate_ibot_head": True})
    assert on.state_dict().keys() == off.state_dict().keys()  # checkpoints load either way
