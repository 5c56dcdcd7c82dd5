"""Student and teacher networks: a timm ViT backbone with iBOT masking, DINO and iBOT heads.

The backbone is any timm ``VisionTransformer`` (class token, optional register tokens),
created with ``dynamic_img_size`` so that global and local crops of any size share one
set of weights. Masked patch tokens (iBOT) are replaced by a learned mask token before
the position embedding, as in DINOv2 (Oquab et al., 2023).
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from pipeline.errors import ConfigError


def create_vit(arch: str, **kwargs: Any) -> nn.Module:
    """A timm ViT without classifier (``num_classes=0``), with a clear error for a bad name."""
    if arch not in timm.list_models():
        close = difflib.get_close_matches(arch, timm.list_models("vit_*"), n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown timm architecture '{arch}'{hint} (see timm.list_models('vit_*'))"
        )
    try:
        model = timm.create_model(arch, pretrained=False, **{"num_classes": 0, **kwargs})
    except TypeError as exc:
        raise ConfigError(f"timm '{arch}' does not accept these arguments: {exc}") from exc
    if not all(hasattr(model, a) for a in ("patch_embed", "blocks", "_pos_embed", "norm")):
        raise ConfigError(f"'{arch}' is not a timm VisionTransformer; pretraining needs a ViT")
    return model


def create_vit_or_any(arch: str, **kwargs: Any) -> nn.Module:
    """Any timm model without classifier, with a clear error for an unknown name."""
    if arch not in timm.list_models():
        close = difflib.get_close_matches(arch, timm.list_models(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown timm architecture '{arch}'{hint}")
    return timm.create_model(arch, pretrained=False, **{"num_classes": 0, **kwargs})


def set_drop_path(vit: nn.Module, rate: float) -> None:
    """The same stochastic-depth rate in every block, as DINOv2 trains (``drop_path_uniform``),
    where timm's ViTs ramp it linearly from 0 in the first block to ``rate`` in the last.

    (DINOv2 computes a dropped residual only for the kept samples of the batch; timm's
    ``DropPath`` zeroes it: the same expectation and the same samples dropped in law.)
    """
    for block in vit.blocks:
        for name in ("drop_path1", "drop_path2"):
            if hasattr(block, name):
                setattr(block, name, DropPath(rate) if rate > 0 else nn.Identity())


class MaskedViT(nn.Module):
    """A timm ViT that can replace masked patches by a mask token (iBOT).

    ``forward(images, masks)`` returns ``(cls B x D, patches B x N x D)``: the class token and
    the patch tokens (registers dropped) after the final norm. ``masks`` is ``B x N`` bool.
    """

    def __init__(self, arch: str, drop_path_uniform: bool = False, **kwargs: Any):
        super().__init__()
        self.arch, self.kwargs = arch, {"num_classes": 0, "dynamic_img_size": True, **kwargs}
        self.vit = create_vit(arch, **self.kwargs)
        if drop_path_uniform:
            set_drop_path(self.vit, float(kwargs.get("drop_path_rate", 0.0)))
        self.embed_dim = int(self.vit.embed_dim)
        self.patch_size = int(self.vit.patch_embed.patch_size[0])
        self.prefix = int(self.vit.num_prefix_tokens)
        self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
        for name in ("fc_norm", "attn_pool", "head"):  # timm's pooling and classifier: not called
            module = getattr(self.vit, name, None)
            if isinstance(module, nn.Module):
                module.requires_grad_(False)

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        vit = self.vit
        x = vit.patch_embed(images)  # B x h x w x D (dynamic size)
        if masks is not None:
            m = masks.reshape(x.shape[:-1])[..., None]  # B x h x w x 1
            x = torch.where(m, self.mask_token.to(x.dtype), x)
        x = vit._pos_embed(x)  # B x (prefix + N) x D
        x = vit.norm_pre(vit.patch_drop(x))
        x = vit.blocks(x)
        x = vit.norm(x)
        return x[:, 0], x[:, self.prefix :]  # B x D, B x N x D


class PrototypeLayer(nn.Module):
    """The weight-normalised prototype layer of DINOv2's head (``torch.nn.utils.weight_norm``
    of a bias-free linear layer): ``W = g * v / ||v||`` row by row, with a per-prototype scale
    ``g`` (``K x 1``, initialised to 1) and direction ``v`` (``K x bottleneck``, the default
    ``nn.Linear`` initialisation). The parameters keep DINOv2's names, ``weight_g`` and
    ``weight_v``.

    ``trainable_scale=False`` fixes ``g`` at 1 (DINO v1's ``norm_last_layer``), a deviation from
    DINOv2, where the scale is trained from the start.
    """

    def __init__(self, bottleneck: int, prototypes: int, trainable_scale: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(prototypes, bottleneck))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default
        self.weight_g = nn.Parameter(torch.ones(prototypes, 1), requires_grad=trainable_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True)  # K x 1
        return F.linear(x, self.weight_v * (self.weight_g / norm))  # ... x K


class DINOHead(nn.Module):
    """MLP -> bottleneck -> L2-normalised -> weight-normalised prototypes, as in DINOv2
    (Oquab et al., 2024; the head of DINO, Caron et al., 2021).

    The MLP's linear layers start from a truncated normal (std 0.02) with zero biases; the
    prototype layer is a :class:`PrototypeLayer`.
    """

    def __init__(
        self,
        in_dim: int,
        prototypes: int = 65536,
        hidden: int = 2048,
        bottleneck: int = 256,
        layers: int = 3,
        trainable_scale: bool = True,
    ):
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [bottleneck]
        mlp = []
        for i in range(len(dims) - 1):
            mlp.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = PrototypeLayer(bottleneck, prototypes, trainable_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # ... x bottleneck
        x = F.normalize(x.float(), dim=-1, eps=1e-6).to(x.dtype)
        return self.last_layer(x)  # ... x prototypes


class SSLNetwork(nn.Module):
    """Backbone plus DINO head and iBOT head (shared with the DINO head unless separate)."""

    def __init__(self, arch: str, arch_kwargs: dict, head: dict, separate_ibot_head: bool):
        super().__init__()
        self.backbone = MaskedViT(arch, **arch_kwargs)
        self.dino_head = DINOHead(self.backbone.embed_dim, **head)
        self.ibot_head = DINOHead(self.backbone.embed_dim, **head) if separate_ibot_head else None

    def patch_head(self) -> DINOHead:
        return self.ibot_head if self.ibot_head is not None else self.dino_head
