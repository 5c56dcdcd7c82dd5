"""Output modes of zoo encoders: which tokens become the tile embedding.

- ``cls``: the class token after the final norm (``tokens[:, 0]``),
- ``cls+mean``: the class token concatenated with the mean of the patch tokens; the mean
  skips the class token and every register token (``tokens[:, num_prefix_tokens:]``), as
  Virchow's authors compute it (FM_ZOO.md: one tool averages registers in by mistake),
- ``mean``: global average of a CNN's feature map (``B x C x H x W``).
"""

from __future__ import annotations

import torch
from torch import nn


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, mode: str) -> torch.Tensor:
    """``B x D`` (or ``B x 2D`` for ``cls+mean``) embedding of ``forward_features`` output:
    ``B x T x D`` ViT tokens (CLS first, then registers, then patches) or a ``B x C x H x W``
    CNN feature map (mode ``mean``)."""
    if mode == "mean" and tokens.ndim == 4:
        return tokens.mean(dim=(2, 3))  # B x C
    if tokens.ndim != 3 or num_prefix_tokens < 1:
        raise ValueError(f"mode '{mode}' needs B x T x D tokens with a class token")
    cls = tokens[:, 0]  # B x D
    if mode == "cls":
        return cls
    if mode == "cls+mean":
        patches = tokens[:, num_prefix_tokens:]  # B x N x D, no CLS, no registers
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)  # B x 2D
    raise ValueError(f"unknown output mode '{mode}'")


class PooledEncoder(nn.Module):
    """``backbone.forward_features`` followed by :func:`pool_tokens`: images ``B x 3 x H x W``
    -> embeddings ``B x D``. ``backbone`` keeps the published (timm) state-dict layout."""

    def __init__(self, backbone: nn.Module, mode: str, num_prefix_tokens: int):
        super().__init__()
        self.backbone, self.mode, self.num_prefix_tokens = backbone, mode, num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_tokens(self.backbone.forward_features(x), self.num_prefix_tokens, self.mode)
