import numpy as np
import pytest

from pipeline.wsi.tiling import tile_grid


def test_tissue_fraction_matches_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.uniform(size=(37, 53)) > 0.6
    width, height = 53 * 16 - 5, 37 * 16 - 9  # the mask covers the slide, not whole blocks
    grid = tile_grid((width, height), 0.25, 0.5, 48, 8, mask, 0.0)
    # the mask's extent is the slide's: nearest-neighbour level-0 mask
    ys = (np.arange(height) * mask.shape[0] / height).astype(int)
    xs = (np.arange(width) * mask.shape[1] / width).astype(int)
    level0 = mask[ys][:, xs]
    size = grid.patch_size_level0
    brute = [level0[y : y + size, x : x + size].mean() for x, y in grid.coords]
    np.testing.assert_allclose(grid.tissue_fraction, brute, atol=0.02)


def test_grid_at_half_mpp_on_a_quarter_mpp_slide():
    mask = np.ones((10, 10), bool)
    grid = tile_grid((4000, 3000), 0.25, 0.5, 256, 0, mask, 0.5)
    assert grid.patch_size_level0 == 512
    assert set(np.unique(grid.coords[:, 0])) == set(range(0, 4000 - 511, 512))
    assert set(np.unique(grid.coords[:, 1])) == set(range(0, 3000 - 511, 512))
    assert (grid.coords[:, 0] + 512 <= 4000).all() and (grid.coords[:, 1] + 512 <= 3000).all()
    overlapped = tile_grid((4000, 3000), 0.25, 0.5, 256, 64, mask, 0.5)
    assert np.diff(np.unique(overlapped.coords[:, 0]))[0] == 384  # (256 - 64) * 2


def test_min_tissue_filters_and_is_inclusive():
    mask = np.zeros((4, 4), bool)
    mask[:, :2] = True  # left half of the slide
    grid = tile_grid((400, 400), 1.0, 1.0, 100, 0, mask, 0.5)
    assert sorted(map(tuple, grid.coords)) == [(0, y) for y in (0, 100, 200, 300)] + [
        (100, y) for y in (0, 100, 200, 300)
    ]
    assert np.all(grid.tissue_fraction == 1.0)
    half = tile_grid((400, 400), 1.0, 1.0, 200, 0, mask, 0.5)
    assert len(half.coords) == 2 and np.allclose(half.tissue_fraction, 1.0)


def test_bad_overlap():
    with pytest.raises(ValueError, match="overlap"):
        tile_grid((100, 100), 0.5, 0.5, 32, 32, np.ones((4, 4), bool), 0.5)
