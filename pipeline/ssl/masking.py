"""Random block masking of patch grids for the iBOT objective (BEiT, Bao et al., 2022).

A share of the images in a batch is masked; their mask ratios are spread evenly over a
range (as DINOv2 does: image ``i`` of ``m`` draws from the ``i``-th of ``m`` equal
sub-ranges), and each mask is grown from random rectangles of random aspect ratio.
"""

from __future__ import annotations

import math

import numpy as np


def block_mask(grid: tuple[int, int], count: int, rng: np.random.Generator,
               min_block: int = 4, max_aspect: float = 3.0) -> np.ndarray:  # fmt: skip
    """An ``h x w`` bool mask with about ``count`` patches in rectangular blocks."""
    h, w = grid
    mask = np.zeros((h, w), dtype=bool)
    count = min(count, h * w)
    log_aspect = (-math.log(max_aspect), math.log(max_aspect))
    for _ in range(100):
        left = count - int(mask.sum())
        if left <= 0:
            break
        before = left
        for _ in range(10):  # try a block that adds at least one new patch
            area = rng.uniform(min(min_block, left), max(min(min_block, left), left))
            aspect = math.exp(rng.uniform(*log_aspect))
            bh = max(1, min(h, int(round(math.sqrt(area * aspect)))))
            bw = max(1, min(w, int(round(math.sqrt(area / aspect)))))
            top, lft = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
            block = mask[top : top + bh, lft : lft + bw]
            new = int(bh * bw - block.sum())
            if 0 < new <= left:
                block[...] = True
                break
        if count - int(mask.sum()) == before:  # blocks no longer fit: fill single patches
            free = np.flatnonzero(~mask.ravel())
            mask.ravel()[rng.choice(free, size=before, replace=False)] = True
            break
    return mask


def batch_masks(batch: int, grid: tuple[int, int], probability: float,
                ratio: tuple[float, float], rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    """``batch x (h * w)`` bool masks: ``round(probability * batch)`` images masked."""
    h, w = grid
    masks = np.zeros((batch, h * w), dtype=bool)
    masked = int(round(probability * batch))
    if masked == 0:
        return masks
    edges = np.linspace(ratio[0], ratio[1], masked + 1)
    for i in range(masked):
        share = rng.uniform(edges[i], edges[i + 1])
        masks[i] = block_mask(grid, int(round(share * h * w)), rng).ravel()
    return masks[rng.permutation(batch)]
