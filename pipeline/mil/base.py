"""The contract every MIL aggregator keeps, and the registry of aggregators by name.

``model(features, mask)`` with ``features`` ``B x N x D`` (bags padded to the longest) and
``mask`` ``B x N`` bool (True = a real instance) returns a dict with ``logits`` (``B x C``)
and, where the model has them, ``attention`` (``B x N`` or ``B x N x C``) or
``instance_scores`` (``B x N x C``); padded instances get weight 0. Models with an
auxiliary objective (CLAM's instance clustering) also return ``aux_loss`` when called with
``labels`` in training mode; a model with a max-instance stream (DSMIL) returns its
``max_logits`` (``B x C``), which training fits with the task's loss where there are no
class labels (survival). Every hyperparameter is a constructor argument. Each class names
its ``head``: the submodules whose size or meaning follows the task's classes (the rest,
the body, carries over to another task; see :func:`head_keys`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.errors import ConfigError

MIL_MODELS: dict[str, type[nn.Module]] = {}


def register_mil(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        MIL_MODELS[name] = cls
        cls.name = name
        return cls

    return add


def load_models() -> dict[str, type[nn.Module]]:
    """Import the aggregator modules (registering them) and return the registry."""
    from pipeline.mil import abmil, clam, dsmil, pooling, transmil  # noqa: F401

    return MIL_MODELS


def make_mil(name: str, in_dim: int, n_classes: int, **kwargs) -> nn.Module:
    """An aggregator by registered name."""
    load_models()
    if name not in MIL_MODELS:
        raise ConfigError(f"unknown MIL model '{name}'; known: {', '.join(sorted(MIL_MODELS))}")
    try:
        return MIL_MODELS[name](in_dim=in_dim, n_classes=n_classes, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"MIL model '{name}': {exc}") from exc


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """``"<submodule>."`` of each of the submodules ``model``'s class names as its head."""
    head = tuple(getattr(type(model), "head", ()))
    if not head:
        raise ConfigError(f"MIL model {type(model).__name__} names no head submodules")
    return tuple(f"{p}." for p in head)


def head_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of ``model``'s head (its class's ``head`` submodules): what a new
    task replaces when a pretrained aggregator is transferred."""
    return [k for k in model.state_dict() if k.startswith(head_prefixes(model))]


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Softmax over real instances only; an empty bag gets all-zero weights (not NaN)."""
    m = mask if scores.ndim == mask.ndim else mask.unsqueeze(-1)
    weights = torch.softmax(scores.float().masked_fill(~m, float("-inf")), dim=dim)
    return torch.nan_to_num(weights, nan=0.0).to(scores.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``B x N x D`` -> ``B x D`` mean over real instances (0 for an empty bag)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1)


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``B x N x D`` -> ``B x D`` max over real instances (0 for an empty bag)."""
    out = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


def mlp_in(in_dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """The instance embedding shared by the aggregators: Linear -> ReLU -> Dropout."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
