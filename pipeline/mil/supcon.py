"""Parts of SC-MIL (Juyal et al., WACV 2024, "SC-MIL: Supervised contrastive multiple
instance learning for imbalanced classification in pathology"): the supervised contrastive
loss on bag embeddings, batches that hold every class, and the curriculum that moves the
weight from the contrastive loss to cross-entropy.

- :func:`supcon_loss`: Khosla et al., NeurIPS 2020, "Supervised contrastive learning"
  (their ``L_out``, as their reference code computes it): for each anchor, the mean over
  its positives (the other bags of its class) of ``log softmax`` over all other bags of
  ``z_i . z_j / tau``, negated and scaled by ``tau / base_tau``. An anchor without a
  positive in the batch adds 0 and still counts in the mean over anchors, as the
  reference's current code does.
- :class:`ClassAwareBatches`: batches in which every class present holds at least two bags
  (so every anchor has a positive), drawn from a seeded generator.
- :func:`curriculum_weight`: the contrastive share of the loss at an epoch. The paper gives
  no public schedule: here a cosine from 1 to 0 over ``epochs`` (the loss is
  ``w * supcon + (1 - w) * cross-entropy``), exposed as an option.
- :class:`ProjectionHead`: the 2-layer MLP of Khosla et al. (hidden layer of the
  embedding's size, 128-d output) from the bag embedding to the space of the contrastive
  loss; trained with the model, not used for prediction.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# aggregators whose outputs hold one ``B x H`` bag embedding (their classifier's input)
SUPCON_MODELS = ("abmil", "clam_sb", "transmil")


def supcon_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
) -> torch.Tensor:
    """Supervised contrastive loss of ``B x D`` bag embeddings (L2-normalised here) with
    ``B`` integer labels; a scalar."""
    if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"embeddings {tuple(embeddings.shape)} and labels {tuple(labels.shape)}")
    z = F.normalize(embeddings, dim=1)  # B x D
    b = z.shape[0]
    logits = z @ z.T / temperature  # B x B
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()  # stability only
    others = ~torch.eye(b, dtype=torch.bool, device=z.device)  # B x B: j != i
    positives = (labels[:, None] == labels[None, :]) & others  # B x B
    exp = torch.exp(logits) * others
    log_prob = logits - torch.log(exp.sum(dim=1, keepdim=True))  # B x B
    count = positives.sum(dim=1)  # B
    mean_pos = (log_prob * positives).sum(dim=1) / count.clamp_min(1)  # 0 without positives
    return -(temperature / base_temperature) * mean_pos.mean()


class ClassAwareBatches:
    """Index batches of ``size`` bags in which every class appears at least ``per_class``
    times (as many classes as fit: ``size // per_class``, the rarest first drawn with
    their share); the rest of each batch is drawn at random. One pass yields
    ``len(labels) // size`` batches; bags of rare classes repeat across batches.

    Args:
        labels: class of each bag.
        size: bags per batch.
        per_class: least bags of each class in a batch (2: every anchor has a positive).
        seed: seed of the draws (a new pass draws anew).
    """

    def __init__(self, labels: Sequence[int], size: int, per_class: int = 2, seed: int = 0):
        self.labels = np.asarray(labels)
        classes, counts = np.unique(self.labels, return_counts=True)
        if size < per_class * len(classes):
            raise ValueError(
                f"batches of {size} bags cannot hold {per_class} of each of {len(classes)} "
                f"classes: use at least {per_class * len(classes)}"
            )
        self.classes = classes[counts > 0]
        self.size, self.per_class, self.seed = size, per_class, seed
        self.passes = 0

    def __len__(self) -> int:
        return max(1, len(self.labels) // self.size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.passes])
        self.passes += 1
        for _ in range(len(self)):
            batch: list[int] = []
            for c in self.classes:  # the guaranteed share of every class
                members = np.flatnonzero(self.labels == c)
                replace = len(members) < self.per_class
                batch += rng.choice(members, self.per_class, replace=replace).tolist()
            rest = np.setdiff1d(np.arange(len(self.labels)), batch)
            fill = self.size - len(batch)
            if fill > 0:
                batch += rng.choice(rest, fill, replace=len(rest) < fill).tolist()
            yield [int(i) for i in rng.permutation(batch)]


def curriculum_weight(epoch: int, epochs: int) -> float:
    """Contrastive share of the loss at ``epoch`` (0-based) of a curriculum of ``epochs``:
    a cosine from 1 at epoch 0 to 0 at ``epochs - 1`` and after (cross-entropy only);
    ``epochs`` of 0 or 1: cross-entropy throughout."""
    if epochs <= 1:
        return 0.0
    t = min(max(epoch, 0), epochs - 1) / (epochs - 1)
    return 0.5 * (1 + math.cos(math.pi * t))


class ProjectionHead(nn.Module):
    """Projection of ``B x H`` bag embeddings to ``B x out_dim`` for :func:`supcon_loss`:
    Linear(H, H) -> ReLU -> Linear(H, out_dim), as Khosla et al. (2020) project the encoder's
    output (their 128-d projection)."""

    def __init__(self, in_dim: int, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim)
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net(embedding)  # B x out_dim
