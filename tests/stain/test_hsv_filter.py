"""Virchow's HSV tissue filter on OpenCV's 8-bit HSV scale: conversion, bounds, threshold,
real tiles."""

import numpy as np
import openslide
import pytest
import torch
from skimage.color import rgb2hsv

from pipeline.stain.hsv_filter import HSVFilter, hsv_share, hsv_shares, rgb_to_hsv


def _tile(*colours_and_counts: tuple[tuple[int, int, int], int], side: int = 10) -> torch.Tensor:
    """A ``3 x side x side`` uint8 tile made of the given colours, pixel counts in order."""
    pixels = [c for colour, n in colours_and_counts for c in [colour] * n]
    assert len(pixels) == side * side
    return torch.tensor(pixels, dtype=torch.uint8).T.reshape(3, side, side)


def _hsv(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(
        int(v) for v in rgb_to_hsv(torch.tensor(rgb, dtype=torch.uint8)[:, None, None]).flatten()
    )


# Derived by hand from OpenCV's formulas (RGB2HSV_b, 12-bit fixed point):
#   V = max; S = (diff * round(255 * 4096 / V) + 2048) >> 12;
#   H = floor((h' * round(737280 / (6 * diff)) + 2048) / 4096), + 180 when negative,
#   h' = g - b (V = r), b - r + 2 diff (V = g), r - g + 4 diff (V = b).
HAND = [
    ((128, 128, 128), (0, 0, 128)),  # grey: diff = 0 -> S = 0, H = 0
    ((0, 0, 0), (0, 0, 0)),  # black: V = 0 -> S = 0
    ((255, 255, 255), (0, 0, 255)),  # white
    ((255, 0, 0), (0, 255, 255)),  # red: h' = 0; S = (255 * 4096 + 2048) >> 12 = 255
    ((0, 255, 0), (60, 255, 255)),  # green: 510 * 482 + 2048 = 247868 -> 60
    ((0, 0, 255), (120, 255, 255)),  # blue: 1020 * 482 + 2048 = 493688 -> 120 (240 deg / 2)
    ((255, 255, 0), (30, 255, 255)),  # yellow: R wins the tie, h' = 255 -> 30
    ((0, 255, 255), (90, 255, 255)),  # cyan: G wins the tie, h' = 765 -> 90
    ((255, 0, 255), (150, 255, 255)),  # magenta: h' = -255 -> floor(-29.5) = -30 -> 150
    # haematoxylin-like purple: S = (100 * 5222 + 2048) >> 12 = 127 (exact 127.5: fixed point
    # rounds down); h' = 50 + 400 = 450, 450 * 1229 + 2048 = 555098 -> 135 (270 deg)
    ((150, 100, 200), (135, 127, 200)),
    # eosin-like pink: S = (80 * 4541 + 2048) >> 12 = 89; h' = -50, -50 * 1536 + 2048 =
    # -74752 -> floor(-18.25) = -19 -> 161 (322.5 deg)
    ((230, 150, 200), (161, 89, 230)),
    ((255, 0, 8), (179, 255, 255)),  # h' = -8: -3856 + 2048 -> -1 -> 179, the top of the scale
]


@pytest.mark.parametrize(("rgb", "hsv"), HAND)
def test_conversion_matches_hand_derived_opencv_values(rgb, hsv):
    assert _hsv(rgb) == hsv


def test_conversion_agrees_with_skimage_within_one_level():
    rng = np.random.default_rng(0)
    colours = np.concatenate(
        [rng.integers(0, 256, (20000, 3)), np.repeat(np.arange(256)[:, None], 3, 1)]
    ).astype(np.uint8)  # N x 3, random colours and every grey
    ours = rgb_to_hsv(torch.from_numpy(colours).T[:, :, None]).squeeze(-1).T.numpy().astype(int)
    ref = rgb2hsv(colours[None])[0] * (180, 255, 255)  # N x 3 on OpenCV's scale
    dh = np.abs(ours[:, 0] - ref[:, 0])
    assert np.minimum(dh, 180 - dh).max() <= 1  # hue is circular: 179.9 and 0 are neighbours
    assert np.abs(ours[:, 1:] - ref[:, 1:]).max() <= 1
    assert (ours[:, 2] == colours.max(1)).all()  # V is the max exactly
    assert ours[:, 0].max() <= 179 and (ours[colours.min(1) == colours.max(1), :2] == 0).all()


def test_batched_and_channel_first_layouts_agree():
    rng = np.random.default_rng(1)
    tiles = torch.from_numpy(rng.integers(0, 256, (5, 3, 12, 10), dtype=np.uint8))
    hsv = rgb_to_hsv(tiles)
    assert hsv.shape == tiles.shape and hsv.dtype == torch.uint8
    assert torch.equal(hsv[2], rgb_to_hsv(tiles[2]))
    shares = hsv_shares(tiles)
    assert shares.dtype == torch.float64 and shares.shape == (5,)
    assert [hsv_share(t) for t in tiles] == shares.tolist()
    assert hsv_share(tiles[0].numpy()) == shares[0]  # numpy arrays too
    with pytest.raises(TypeError, match="uint8"):
        hsv_share(tiles[0].float())
    with pytest.raises(ValueError, match="3 x H x W"):
        hsv_share(tiles[0, :2])


PURPLE, WHITE = (150, 100, 200), (245, 245, 245)


def test_share_of_exactly_60_percent_is_kept_and_59_dropped():
    keep, drop = _tile((PURPLE, 60), (WHITE, 40)), _tile((PURPLE, 59), (WHITE, 41))
    filt = HSVFilter()
    assert filt.share(keep) == 0.6 and filt.keep(keep)
    assert filt.share(drop) == pytest.approx(0.59) and not filt.keep(drop)
    assert filt.keep_batch(torch.stack([keep, drop])).tolist() == [True, False]
    assert filt.shares(torch.stack([keep, drop])).tolist() == [0.6, 0.59]
    # a filter that asks for 59% keeps both
    assert HSVFilter(min_share=0.59).keep_batch(torch.stack([keep, drop])).all()


# (inside, its HSV, outside, its HSV): pixels just inside and just outside each lower bound
BOUNDS = {
    "hue >= 90": ((0, 255, 251), (90, 255, 255), (0, 255, 250), (89, 255, 255)),
    "saturation >= 8": ((248, 247, 255), (124, 8, 255), (248, 248, 255), (120, 7, 255)),
    "value >= 103": ((52, 0, 103), (135, 255, 103), (51, 0, 102), (135, 255, 102)),
}


@pytest.mark.parametrize("bound", list(BOUNDS))
def test_each_bound_is_inclusive(bound):
    inside, inside_hsv, outside, outside_hsv = BOUNDS[bound]
    assert _hsv(inside) == inside_hsv and _hsv(outside) == outside_hsv
    filt = HSVFilter()
    assert filt.share(_tile((inside, 100))) == 1.0 and filt.keep(_tile((inside, 100)))
    assert filt.share(_tile((outside, 100))) == 0.0 and not filt.keep(_tile((outside, 100)))


def test_upper_hue_bound():
    top, pink = _tile(((255, 0, 8), 100)), _tile(((255, 0, 77), 100))  # H = 179 and 171
    assert _hsv((255, 0, 77)) == (171, 255, 255)
    assert HSVFilter().keep(top) and HSVFilter().keep(pink)  # 180 admits every hue from 90 up
    assert not HSVFilter(hue=(90, 170)).keep(pink) and HSVFilter(hue=(90, 171)).keep(pink)
    with pytest.raises(ValueError, match="hue range"):
        HSVFilter(hue=(90, 360))  # degrees are not OpenCV's scale
    with pytest.raises(ValueError, match="min_share"):
        HSVFilter(min_share=60)


def test_real_he_passes_and_glass_fails(cmu_svs, skin_tiles, carcinoma):
    filt = HSVFilter()
    quadrants = carcinoma[:, :448, :448].reshape(3, 2, 224, 2, 224).permute(1, 3, 0, 2, 4)
    tiles = torch.cat([skin_tiles, quadrants.reshape(4, 3, 224, 224)])  # 13 x 3 x 224 x 224
    glass = (tiles.amin(dim=1) > 220).float().mean(dim=(1, 2))  # near-white share of each
    shares = filt.shares(tiles)
    tissue, mostly_glass = glass < 0.15, glass > 0.6
    assert tissue.sum() >= 7 and mostly_glass.sum() >= 2  # real tiles of both kinds
    assert (shares[tissue] >= 0.6).all() and (shares[mostly_glass] < 0.6).all(), shares
    with openslide.OpenSlide(str(cmu_svs)) as slide:  # the scan's top-left corner is glass
        corner = np.array(slide.read_region((0, 0), 0, (224, 224)).convert("RGB"))
    corner = torch.from_numpy(corner).permute(2, 0, 1)  # 3 x 224 x 224
    assert corner.float().mean() > 200  # bright background indeed
    assert filt.share(corner) < 0.1 and not filt.keep(corner)
