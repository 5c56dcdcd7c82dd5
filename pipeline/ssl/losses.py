"""DINOv2 objectives: DINO and iBOT cross-entropies, teacher centring, KoLeo and KDE terms.

All softmaxes and regularisers run in fp32 whatever the autocast dtype. Batch statistics
(centres, Sinkhorn-Knopp marginals) are all-reduced across processes when a process
group is initialised, so every rank sees the global batch. Guards keep tiny batches
(one image, no masked patch) and duplicated images from producing inf or NaN.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp (SwAV, Caron et al., 2020; used by DINOv2).

    ``logits`` is ``B x K`` on this rank; the returned ``B x K`` rows are distributions
    whose prototype marginals are equal over the global batch. The maximum is subtracted
    before ``exp`` so large logits over a small temperature cannot overflow.
    """
    logits = logits.float()
    peak = logits.max().clone()
    if _world_size() > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    q = torch.exp((logits - peak) / temp).t()  # K x B
    total_b = torch.tensor(float(q.shape[1]), device=q.device)
    total_b = _all_reduce(total_b)
    k = q.shape[0]
    q /= _all_reduce(q.sum()).clamp_min(1e-30)
    for _ in range(iterations):
        rows = _all_reduce(q.sum(dim=1, keepdim=True)).clamp_min(1e-30)  # K x 1
        q /= rows * k
        q /= q.sum(dim=0, keepdim=True).clamp_min(1e-30) * total_b
    q *= total_b
    return q.t()  # B x K


class TeacherTargets(nn.Module):
    """Teacher softmax with an EMA-updated centre (DINO), or Sinkhorn-Knopp (DINOv2)."""

    def __init__(self, dim: int, mode: str = "sinkhorn", center_momentum: float = 0.9):
        super().__init__()
        if mode not in ("centering", "sinkhorn"):
            raise ValueError(f"teacher target mode must be centering or sinkhorn, not '{mode}'")
        self.mode, self.center_momentum = mode, center_momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, temp: float) -> torch.Tensor:
        """``N x K`` teacher logits -> ``N x K`` target distributions (fp32)."""
        logits = logits.float()
        if self.mode == "sinkhorn":
            return sinkhorn_knopp(logits, temp)
        targets = F.softmax((logits - self.center) / temp, dim=-1)
        self.update_center(logits)
        return targets

    @torch.no_grad()
    def update_center(self, logits: torch.Tensor) -> None:
        total = _all_reduce(logits.sum(dim=0, keepdim=True))
        count = _all_reduce(torch.tensor(float(logits.shape[0]), device=logits.device))
        if count > 0:
            mean = total / count
            self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)


def dino_loss(
    student: list[torch.Tensor], teacher: list[torch.Tensor], temp: float
) -> torch.Tensor:
    """DINO cross-entropy (Caron et al., 2021) averaged over (student view, teacher view) pairs.

    ``student``: per view ``B x K`` logits; ``teacher``: per global view ``B x K`` targets.
    Views ``i < len(teacher)`` of the student are the same crops as the teacher's and are
    not paired with themselves.
    """
    total, pairs = 0.0, 0
    log_probs = [F.log_softmax(s.float() / temp, dim=-1) for s in student]
    for t_index, target in enumerate(teacher):
        for s_index, lp in enumerate(log_probs):
            if s_index == t_index:
                continue
            total = total + torch.sum(-target * lp, dim=-1).mean()
            pairs += 1
    return total / max(pairs, 1)


def ibot_loss(
    student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor, temp: float
) -> torch.Tensor:
    """iBOT masked-patch cross-entropy (Zhou et al., 2022), weighted as in DINOv2.

    ``student`` and ``teacher`` hold the ``M x K`` logits / targets of the masked patches
    only (in ``masks.nonzero()`` order); ``masks`` is ``B x N`` bool over all ``B`` global
    crops of this rank. Each image's patches are weighted by ``1 / its masked count`` and the
    sum is divided by ``B``, masked or not (DINOv2's ``forward_masked``), so the term scales
    with the share of masked images; no masked patch gives 0.
    """
    if student.shape[0] == 0:
        return student.sum() * 0.0
    per_patch = torch.sum(-teacher * F.log_softmax(student.float() / temp, dim=-1), dim=-1)  # M
    counts = masks.sum(dim=1, keepdim=True).clamp_min(1).expand_as(masks)  # B x N
    weights = 1.0 / counts[masks].float()  # M
    return (per_patch * weights).sum() / masks.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo uniformity term (Sablayrolles et al., 2019): ``-mean log(nearest distance)``.

    On L2-normalised ``B x D`` embeddings, in fp32. Fewer than two images give 0; exact
    duplicates give a finite value and gradient (the distance is taken with ``eps`` added).
    """
    if x.shape[0] < 2:
        return x.sum() * 0.0
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        sim = x @ x.t()  # B x B
        sim.fill_diagonal_(-2.0)
        nearest = sim.argmax(dim=1)  # B
    distance = F.pairwise_distance(x, x[nearest], eps=eps)  # B
    return -torch.log(distance + eps).mean()


def kde_loss(x: torch.Tensor, concentration: float = 4.0) -> torch.Tensor:
    """Kernel-density uniformity term, the KoLeo replacement of Midnight (Karasikov et al., 2025).

    The log of a von Mises-Fisher kernel density estimate at each embedding, averaged:
    ``mean_i log mean_{j != i} exp(kappa (x_i . x_j - 1))`` on L2-normalised ``B x D``
    embeddings, in fp32 (the uniformity loss of Wang and Isola (2020) with ``t = kappa / 2``).
    Minimising it spreads the embeddings over the sphere (a gradient step on it alone widens
    the mean pairwise angle, tested). Fewer than two images give 0.
    """
    b = x.shape[0]
    if b < 2:
        return x.sum() * 0.0
    x = F.normalize(x.float(), dim=-1, eps=1e-8)
    logits = concentration * (x @ x.t() - 1.0)  # B x B, <= 0
    logits = logits.masked_fill(torch.eye(b, dtype=torch.bool, device=x.device), -math.inf)
    return (torch.logsumexp(logits, dim=1) - math.log(b - 1)).mean()


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the rows of ``N x K`` distributions."""
    p = probs.float().clamp_min(1e-12)
    return -(p * p.log()).sum(dim=-1).mean()


@torch.no_grad()
def rankme(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RankMe effective rank (Garrido et al., 2023): ``exp(entropy of normalised singular
    values)`` of ``N x D`` embeddings; near 1 means collapse, up to ``min(N, D)``."""
    s = torch.linalg.svdvals(x.float())
    p = s / (s.sum() + eps) + eps
    return torch.exp(-(p * p.log()).sum())
