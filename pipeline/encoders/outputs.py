"""Output modes of zoo encoders: which tokens become the tile embedding.

- ``cls``: the class token after the final norm (``tokens[:, 0]``),
- ``cls+mean``: the class token concatenated with the mean of the patch tokens; the mean
  skips the class token and every register token (``tokens[:, num_prefix_tokens:]``), as
  Virchow's authors compute it (FM_ZOO.md: one tool averages registers in by mistake),
- ``mean``: global average of a CNN's or a Swin's feature map (timm's own head pooling),
- ``pooler``: a ``transformers`` model's ``pooler_output`` (for DINOv2 models the class
  token after the final norm; Hibou's authors name this output).
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
    """A zoo network followed by its output mode: images ``B x 3 x H x W`` -> embeddings
    ``B x D``. ``backbone`` keeps the published state-dict layout: a timm model (tokens from
    ``forward_features``; ``mean`` is timm's head pooling with ``num_classes=0``) or a
    ``transformers`` model (tokens: ``last_hidden_state``, after the final norm)."""

    def __init__(self, backbone: nn.Module, mode: str, num_prefix_tokens: int, loader="timm"):
        super().__init__()
        self.backbone, self.mode, self.num_prefix_tokens = backbone, mode, num_prefix_tokens
        self.loader = loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.loader == "transformers":
            out = self.backbone(pixel_values=x)
            if self.mode == "pooler":
                return out.pooler_output  # B x D
            return pool_tokens(out.last_hidden_state, self.num_prefix_tokens, self.mode)
        if self.mode == "mean":
            return self.backbone(x)  # B x C: timm's global average pool, no classifier
        return pool_tokens(self.backbone.forward_features(x), self.num_prefix_tokens, self.mode)
