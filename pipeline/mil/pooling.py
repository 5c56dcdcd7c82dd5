"""Mean and max pooling baselines: an instance embedding, a pooled bag vector, a linear head."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.mil.base import masked_max, masked_mean, mlp_in, register_mil


class _Pooling(nn.Module):
    head = ("classifier",)

    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256, dropout: float = 0.25):
        super().__init__()
        self.embed = mlp_in(in_dim, hidden, dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, features: torch.Tensor, mask: torch.Tensor, labels=None) -> dict:
        h = self.embed(features)  # B x N x H
        instance = self.classifier(h)  # B x N x C
        return {"logits": self.classifier(self.pool(h, mask)), "instance_scores": instance}


@register_mil("mean")
class MeanPool(_Pooling):
    """Mean of the embedded instances, then a linear classifier."""

    def pool(self, h, mask):
        return masked_mean(h, mask)


@register_mil("max")
class MaxPool(_Pooling):
    """Element-wise max of the embedded instances, then a linear classifier."""

    def pool(self, h, mask):
        return masked_max(h, mask)
