"""CLAM: clustering-constrained attention MIL (Lu et al., Nature Biomedical Engineering 2021).

Gated attention pooling (one branch, ``clam_sb``, or one per class, ``clam_mb``) plus an
instance-level clustering objective: for the bag's class, the ``k`` most attended
instances are pseudo-labelled positive and the ``k`` least attended negative for that
class's instance classifier; with ``subtyping`` the ``k`` most attended instances are also
negatives for every other class. The instance loss is cross-entropy (the paper's default
is a smooth SVM loss) and is returned as ``aux_loss``; training combines it with the bag
loss as ``bag_weight * bag + (1 - bag_weight) * instance``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.mil.abmil import GatedAttention
from pipeline.mil.base import masked_softmax, mlp_in, register_mil


class _CLAM(nn.Module):
    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: int = 512,
        attn_dim: int = 256,
        dropout: float = 0.25,
        k_sample: int = 8,
        subtyping: bool = False,
    ):
        super().__init__()
        self.n_classes, self.k_sample, self.subtyping = n_classes, k_sample, subtyping
        self.embed = mlp_in(in_dim, hidden, dropout)
        self.attention = GatedAttention(hidden, attn_dim, dropout, self.branches_for(n_classes))

        self.instance_classifiers = nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_classes))

    def branches_for(self, n_classes: int) -> int:
        return 1

    def instance_loss(
        self, h: torch.Tensor, attention: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """Mean CE of the pseudo-labelled instances over the bags of the batch (loop over
        bags only; B is small in MIL)."""
        losses = []
        for b in range(h.shape[0]):
            n = int(mask[b].sum())
            k = min(self.k_sample, n // 2)
            if k < 1:
                continue
            hb = h[b][mask[b]]  # n x H
            for c in range(self.n_classes):
                in_class = c == int(labels[b])
                if not in_class and not self.subtyping:
                    continue
                a = attention[b][mask[b]]
                a = a[:, c] if a.ndim == 2 else a  # n
                top = torch.topk(a, k).indices
                if in_class:
                    bottom = torch.topk(-a, k).indices
                    idx = torch.cat([top, bottom])
                    target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
                else:
                    idx, target = top, torch.zeros(k, dtype=torch.long, device=h.device)
                losses.append(F.cross_entropy(self.instance_classifiers[c](hb[idx]), target))
        if not losses:
            return h.sum() * 0.0
        return torch.stack(losses).mean()


@register_mil("clam_sb")
class CLAMSingleBranch(_CLAM):
    """CLAM with one attention branch shared by all classes.

    Args:
        in_dim: feature size D.
        n_classes: classes C.
        hidden: instance embedding size.
        attn_dim: attention hidden size.
        dropout: dropout of embedding and attention.
        k_sample: instances pseudo-labelled at each end of the attention ranking.
        subtyping: also use out-of-class instance targets (mutually exclusive classes).
    """

    head = ("classifier", "instance_classifiers")

    def __init__(self, in_dim: int, n_classes: int, **kwargs):
        super().__init__(in_dim, n_classes, **kwargs)
        self.classifier = nn.Linear(self.embed[0].out_features, n_classes)

    def forward(self, features: torch.Tensor, mask: torch.Tensor, labels=None) -> dict:
        h = self.embed(features)  # B x N x H
        weights = masked_softmax(self.attention(h).squeeze(-1), mask)  # B x N
        bag = torch.einsum("bn,bnh->bh", weights, h)  # B x H
        out = {"logits": self.classifier(bag), "attention": weights, "embedding": bag}
        if labels is not None and self.training:
            out["aux_loss"] = self.instance_loss(h, weights, mask, labels)
        return out


@register_mil("clam_mb")
class CLAMMultiBranch(_CLAM):
    """CLAM with one attention branch and one bag classifier per class (arguments as
    :class:`CLAMSingleBranch`); ``attention`` is ``B x N x C``."""

    def branches_for(self, n_classes: int) -> int:
        return n_classes

    head = ("classifiers", "instance_classifiers", "attention.w")

    def __init__(self, in_dim: int, n_classes: int, **kwargs):
        super().__init__(in_dim, n_classes, **kwargs)
        hidden = self.embed[0].out_features
        self.classifiers = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(n_classes))

    def forward(self, features: torch.Tensor, mask: torch.Tensor, labels=None) -> dict:
        h = self.embed(features)  # B x N x H
        weights = masked_softmax(self.attention(h), mask)  # B x N x C
        bags = torch.einsum("bnc,bnh->bch", weights, h)  # B x C x H
        logits = torch.cat([clf(bags[:, c]) for c, clf in enumerate(self.classifiers)], dim=1)
        out = {"logits": logits, "attention": weights, "embedding": bags}
        if labels is not None and self.training:
            out["aux_loss"] = self.instance_loss(h, weights, mask, labels)
        return out
