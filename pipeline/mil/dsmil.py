"""DSMIL: dual-stream MIL (Li, Li and Eliceiri, CVPR 2021).

Stream 1 scores every instance with a linear classifier and takes, per class, the
highest-scoring (critical) instance. Stream 2 attends from every instance to the critical
one in a learned query space (``softmax(<q_i, q_crit> / sqrt(d))``) and pools value
embeddings into one bag vector per class, classified by a 1-D convolution over them.
``logits`` are the bag stream's; the max-instance stream's logits (``max_logits``) are
trained alongside, as the paper sums the two losses: with class labels the model returns
their cross-entropy as ``aux_loss``; for survival, training applies the survival loss to
them (the paper has classification only). The critical-instance choice is an argmax, so
the instance classifier learns only through this second loss. ``embedding`` holds the
per-class bag vectors (``B x C x D``), which MHIM-MIL's consistency loss compares.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.mil.base import masked_max, masked_softmax, register_mil


@register_mil("dsmil")
class DSMIL(nn.Module):
    """Dual-stream MIL.

    Args:
        in_dim: feature size D.
        n_classes: outputs C.
        q_dim: query size.
        dropout: dropout on the value embedding.
    """

    head = ("instance_classifier", "bag_classifier")

    def __init__(self, in_dim: int, n_classes: int, q_dim: int = 128, dropout: float = 0.0):
        super().__init__()
        self.instance_classifier = nn.Linear(in_dim, n_classes)
        self.query = nn.Sequential(
            nn.Linear(in_dim, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh()
        )
        self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, in_dim), nn.ReLU())
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=in_dim)
        self.q_dim = q_dim

    def forward(self, features: torch.Tensor, mask: torch.Tensor, labels=None) -> dict:
        scores = self.instance_classifier(features)  # B x N x C
        critical = scores.masked_fill(~mask.unsqueeze(-1), float("-inf")).argmax(dim=1)  # B x C
        q = self.query(features)  # B x N x Q
        q_crit = torch.gather(q, 1, critical.unsqueeze(-1).expand(-1, -1, q.shape[-1]))  # B x C x Q
        attention = masked_softmax(
            q @ q_crit.transpose(1, 2) / math.sqrt(self.q_dim), mask
        )  # B x N x C
        bags = attention.transpose(1, 2) @ self.value(features)  # B x C x D
        logits = self.bag_classifier(bags).squeeze(-1)  # B x C
        max_logits = masked_max(scores, mask)  # B x C
        out = {
            "logits": logits,
            "attention": attention,
            "instance_scores": scores,
            "max_logits": max_logits,
            "embedding": bags,
        }
        if labels is not None and self.training:
            out["aux_loss"] = F.cross_entropy(max_logits, labels)
        return out
