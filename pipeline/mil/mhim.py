"""Masked hard instance mining (MHIM-MIL; Tang et al., "Multiple instance learning framework
with masked hard instance mining for whole slide image classification", ICCV 2023).

A momentum teacher (an exponential moving average of the student) scores every instance of
a training bag with its attention; the student is trained on the bag with instances masked
out: the most attended ones (the "easy" instances the teacher already relies on, so that the
student has to find the harder evidence), plus random and least attended ones. Its loss is
the task's loss plus ``alpha`` times a soft cross-entropy pulling the student's bag embedding
towards the teacher's (whole-bag) one.

The pure pieces live here: which instances are masked (:func:`masked_indices`,
:func:`keep_mask`), the cosine schedules (:func:`cosine_schedule`), the consistency loss
(:func:`soft_cross_entropy`) and the teacher's update (:func:`ema_update`); the training
step that uses them is :class:`pipeline.mil.training.MILModule`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# aggregators with a per-instance score for the teacher (:func:`instance_scores`) and a bag
# ``embedding``: ABMIL's attention weights and pooled bag; TransMIL's class-token attention
# of its last layer (the reference uses its first layer's) and its normalised class token;
# DSMIL's instance-classifier scores, the highest over classes (the reference's MHIM-v2
# default, ``cls_attn`` with ``attn_index='max'``), and its per-class bag vectors
MHIM_MODELS = ("abmil", "transmil", "dsmil")

# the reference rounds ``n * ratio`` up; the tolerance keeps float noise (10 * 0.7 =
# 7.000000000000001) from masking one instance more
_EPS = 1e-9


class MaskedIndices(NamedTuple):
    """Instance indices (sorted ``LongTensor``\\ s) masked in one bag, per rule and together."""

    random: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    union: torch.Tensor


def mask_count(n: int, ratio: float) -> int:
    """``ceil(n * ratio)``: the instances a share ``ratio`` of ``n`` masks."""
    return min(n, math.ceil(n * ratio - _EPS)) if ratio > 0 else 0


def _select(
    attention: torch.Tensor,
    largest: bool,
    ratio: float,
    random_ratio: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The reference's selection: the ``ceil(n * ratio / random_ratio)`` instances of highest
    (``largest``) or lowest attention are the candidates, of which a random
    ``ceil(k * random_ratio)`` are masked; where ``ratio / random_ratio > 1`` all ``n`` are
    candidates and a random ``ceil(n * ratio)`` are masked."""
    n = attention.numel()
    if ratio <= 0 or n == 0:
        return torch.zeros(0, dtype=torch.long)
    share = ratio / random_ratio
    if share > 1:
        share, random_ratio = 1.0, ratio
    k = mask_count(n, share)
    candidates = torch.topk(attention.detach().float().cpu(), k, largest=largest).indices
    if random_ratio < 1:
        order = torch.randperm(k, generator=generator)
        candidates = candidates[order[: mask_count(k, random_ratio)]]
    return candidates.sort().values


def masked_indices(
    attention: torch.Tensor,
    mask_ratio: float = 0.0,
    mask_ratio_l: float = 0.0,
    mask_ratio_h: float = 0.0,
    mask_ratio_hr: float = 1.0,
    generator: torch.Generator | None = None,
) -> MaskedIndices:
    """The instances of one bag (``attention``: ``N``, the teacher's) that the student does
    not see, as ``MHIM.get_mask`` of the reference implementation:

    - random: a random ``ceil(N * mask_ratio)`` instances;
    - low: the ``ceil(N * mask_ratio_l)`` instances of lowest attention;
    - high: of the ``k = ceil(N * mask_ratio_h / mask_ratio_hr)`` instances of highest
      attention, a random ``ceil(k * mask_ratio_hr)`` (``mask_ratio_hr`` 1: the top
      ``ceil(N * mask_ratio_h)`` themselves; 0.5: a random half of twice as many);

    each chosen from all ``N`` instances (so the sets may overlap), and masked together.
    """
    if attention.ndim != 1:
        raise ValueError(f"attention of one bag must be 1-D (N), got {tuple(attention.shape)}")
    for name, value in (("mask_ratio", mask_ratio), ("mask_ratio_l", mask_ratio_l)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if not 0 <= mask_ratio_h <= 1 or not 0 < mask_ratio_hr <= 1:
        raise ValueError(
            f"mask_ratio_h must be in [0, 1] and mask_ratio_hr in (0, 1], got "
            f"{mask_ratio_h} and {mask_ratio_hr}"
        )
    # the reference draws the random set as a random share of all-instance candidates
    # (random_ratio 0.001, so that ratio / random_ratio > 1)
    random = _select(attention, False, mask_ratio, 1e-3, generator)
    low = _select(attention, False, mask_ratio_l, 1.0, generator)
    high = _select(attention, True, mask_ratio_h, mask_ratio_hr, generator)
    union = torch.cat([random, low, high]).unique()  # sorted
    return MaskedIndices(random, low, high, union)


def instance_scores(out: dict) -> torch.Tensor:
    """``B x N``: how much a teacher's output (of one of ``MHIM_MODELS``) relies on each
    instance: its ``attention``, or for a model with ``B x N x C`` instance scores (DSMIL)
    their highest class score."""
    if "max_logits" in out:  # DSMIL: the instance stream's scores
        return out["instance_scores"].float().amax(dim=-1)
    return out["attention"].float()


def keep_mask(
    attention: torch.Tensor,
    mask: torch.Tensor,
    mask_ratio: float = 0.0,
    mask_ratio_l: float = 0.0,
    mask_ratio_h: float = 0.0,
    mask_ratio_hr: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``B x N`` bool: the instances the student sees. ``attention`` (``B x N``, the
    teacher's) and ``mask`` (``B x N``, True = a real instance) of a padded batch; each bag's
    real instances are masked by :func:`masked_indices`. A bag whose instances would all be
    masked keeps one of them at random (the student needs an instance to pool)."""
    if attention.ndim != 2 or attention.shape != mask.shape:
        raise ValueError(
            f"MHIM needs a B x N attention like the mask {tuple(mask.shape)}, got "
            f"{tuple(attention.shape)}"
        )
    keep = mask.clone()  # B x N
    for b in range(mask.shape[0]):
        real = mask[b].nonzero().squeeze(1)  # n: positions of the real instances
        if real.numel() == 0:
            continue
        sets = masked_indices(
            attention[b, real], mask_ratio, mask_ratio_l, mask_ratio_h, mask_ratio_hr, generator
        )
        hidden = real[sets.union.to(real.device)]
        if hidden.numel() == real.numel():
            spared = torch.randint(real.numel(), (1,), generator=generator).item()
            hidden = hidden[hidden != real[spared]]
        keep[b, hidden] = False
    return keep


def cosine_schedule(base: float, final: float, step: int, total: int) -> float:
    """The reference's ``cosine_scheduler`` (no warm-up) at ``step`` of ``total``:
    ``final + (base - final) * (1 + cos(pi * step / total)) / 2``; ``final`` from ``total``
    on."""
    if total <= 0 or step >= total:
        return final
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * max(step, 0) / total))


def soft_cross_entropy(
    student: torch.Tensor, teacher: torch.Tensor, temp_s: float = 1.0, temp_t: float = 0.1
) -> torch.Tensor:
    """``mean_b sum_d -softmax(teacher / temp_t) * log_softmax(student / temp_s)`` over the
    last dimension (``B x H`` bag embeddings); the teacher's side gets no gradient."""
    target = F.softmax(teacher.detach().float() / temp_t, dim=-1)  # B x H
    return torch.sum(-target * F.log_softmax(student.float() / temp_s, dim=-1), dim=-1).mean()


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter by parameter
    (buffers are not averaged, as in the reference)."""
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach().to(t.dtype), alpha=1 - momentum)
