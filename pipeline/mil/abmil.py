"""Attention-based MIL with gated attention (Ilse, Tomczak and Welling, ICML 2018)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.mil.base import masked_softmax, mlp_in, register_mil


class GatedAttention(nn.Module):
    """``a = w^T (tanh(V h) * sigmoid(U h))`` per instance: ``B x N x H -> B x N x K``."""

    def __init__(
        self,
        dim: int,
        attn_dim: int = 128,
        dropout: float = 0.25,
        branches: int = 1,
        gated: bool = True,
    ):
        super().__init__()
        self.v = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.u = (
            nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
            if gated
            else None
        )
        self.w = nn.Linear(attn_dim, branches)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.v(h)
        if self.u is not None:
            a = a * self.u(h)
        return self.w(a)  # B x N x K


@register_mil("abmil")
class ABMIL(nn.Module):
    """Gated-attention pooling of embedded instances, then a linear classifier.

    Args:
        in_dim: feature size D.
        n_classes: outputs C (classes, or survival time bins / 1 risk).
        hidden: instance embedding size.
        attn_dim: attention hidden size.
        dropout: dropout of embedding and attention.
        gated: gated attention (else plain tanh attention).
    """

    head = ("classifier",)  # the modules of the task's classes (see base.head_keys)

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 256,
        attn_dim: int = 128,
        dropout: float = 0.25,
        gated: bool = True,
    ):
        super().__init__()
        self.embed = mlp_in(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim, dropout, 1, gated)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor, labels=None) -> dict:
        h = self.embed(features)  # B x N x H
        weights = masked_softmax(self.attention(h).squeeze(-1), mask)  # B x N
        bag = torch.einsum("bn,bnh->bh", weights, h)  # B x H
        return {"logits": self.classifier(bag), "attention": weights, "embedding": bag}
