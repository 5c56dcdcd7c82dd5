"""Random block masking of patch grids for the iBOT objective (BEiT, Bao et al., 2022), as
DINOv2 draws its masks (``MaskingGenerator`` and ``collate_data_and_cast``).

A share of the global crops of a batch is masked; their mask ratios are spread evenly over
a range (image ``i`` of ``m`` draws its ratio from the ``i``-th of ``m`` equal sub-ranges),
and each mask is grown from random rectangles: area uniform in ``[min_block, room]`` patches,
aspect ratio log-uniform in ``[0.3, 1 / 0.3]``, strictly narrower and shorter than the grid,
placed where it fits (never clipped at the border), kept when it adds between 1 and ``room``
new patches, at most 10 tries per block. Growth stops when a block can no longer be placed,
so a mask may hold fewer patches than asked for (no single-patch fill).
"""

from __future__ import annotations

import math

import numpy as np


def block_mask(
    grid: tuple[int, int],
    count: int,
    rng: np.random.Generator,
    min_block: int = 4,
    max_block: float | None = None,
    min_aspect: float = 0.3,
) -> np.ndarray:
    """An ``h x w`` bool mask of at most ``count`` patches in rectangular blocks.

    ``max_block`` caps the area of one block (DINOv2: half the grid); ``None``: ``count``.
    """
    h, w = grid
    mask = np.zeros((h, w), dtype=bool)
    cap = count if max_block is None else max_block
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    masked = 0
    while masked < count:
        room = min(count - masked, cap)
        added = 0
        for _ in range(10):
            area = min_block + (room - min_block) * rng.random()  # in [room, min_block] if smaller
            aspect = math.exp(rng.uniform(*log_aspect))
            bh = int(round(math.sqrt(area * aspect)))
            bw = int(round(math.sqrt(area / aspect)))
            if bw < w and bh < h:
                top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
                block = mask[top : top + bh, left : left + bw]
                new = bh * bw - int(block.sum())
                if 0 < new <= room:
                    block[...] = True
                    added = new
                    break
        if added == 0:
            break
        masked += added
    return mask


def batch_masks(
    batch: int,
    grid: tuple[int, int],
    probability: float,
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """``batch x (h * w)`` bool masks of the global crops: ``int(probability * batch)`` images
    masked (DINOv2 rounds down), each with ``int(share * h * w)`` patches asked for, blocks of
    at most half the grid, in random order."""
    h, w = grid
    n = h * w
    masks = np.zeros((batch, n), dtype=bool)
    masked = int(probability * batch)
    if masked == 0:
        return masks
    edges = np.linspace(ratio[0], ratio[1], masked + 1)
    for i in range(masked):
        share = rng.uniform(edges[i], edges[i + 1])
        masks[i] = block_mask(grid, int(n * share), rng, max_block=0.5 * n).ravel()
    return masks[rng.permutation(batch)]
