import pytest
import torch

from pipeline.stain import MacenkoNormalizer, ReinhardNormalizer
from pipeline.stain.augment import HEDJitter, HSVJitter, StainBankTransfer


def _augmenters(carcinoma, seed):
    g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    bank = [
        MacenkoNormalizer().fit(carcinoma[:, :500]),
        ReinhardNormalizer().fit(carcinoma[:, 500:]),
    ]
    return [
        HEDJitter(generator=g()),
        HSVJitter(generator=g()),
        StainBankTransfer(bank, generator=g()),
    ]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_augmentations_keep_shape_dtype_and_are_reproducible(which, carcinoma, skin_tiles):
    a = _augmenters(carcinoma, 0)[which](skin_tiles)
    b = _augmenters(carcinoma, 0)[which](skin_tiles)
    c = _augmenters(carcinoma, 1)[which](skin_tiles)
    assert a.shape == skin_tiles.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a.int() - skin_tiles.int()).abs().float().mean() > 0.5  # it does change colours
    single = _augmenters(carcinoma, 0)[which](skin_tiles[0])  # one tile, as in a DataLoader worker
    assert single.shape == skin_tiles[0].shape
    floats = _augmenters(carcinoma, 0)[which](skin_tiles.float() / 255)
    assert floats.dtype == torch.float32 and floats.min() >= 0 and floats.max() <= 1


@pytest.mark.parametrize("which", [0, 1])
def test_each_image_draws_its_own_parameters(which, carcinoma, skin_tiles):
    twins = skin_tiles[:1].repeat(4, 1, 1, 1)
    out = _augmenters(carcinoma, 3)[which](twins)
    assert len({tuple(o.float().mean(dim=(1, 2)).round(decimals=2).tolist()) for o in out}) == 4


def test_zero_strength_is_identity(skin_tiles):
    assert (HEDJitter(0.0, 0.0)(skin_tiles).int() - skin_tiles.int()).abs().max() <= 1
    assert (HSVJitter(0.0, 0.0, 0.0)(skin_tiles).int() - skin_tiles.int()).abs().max() <= 1


def test_hed_jitter_moves_haematoxylin_and_eosin(skin_tiles):
    from pipeline.stain.color import rgb_to_hed

    x = skin_tiles.float() / 255
    out = HEDJitter(0.3, 0.0, torch.Generator().manual_seed(0))(x)
    ratio = rgb_to_hed(out).mean(dim=(2, 3)) / rgb_to_hed(x).mean(dim=(2, 3))  # B x 3
    assert ((ratio[:, :2] - 1).abs() > 0.01).any() and ((ratio[:, :2] - 1).abs() < 0.35).all()


def test_empty_bank_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        StainBankTransfer([])
