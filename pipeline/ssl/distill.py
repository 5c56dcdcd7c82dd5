"""Distillation from frozen expert encoders, as GPFM's unified knowledge distillation.

Ma et al., "Towards a generalizable pathology foundation model via unified knowledge
distillation", Nat. Biomed. Eng. 2025 (code: birkhoffkiki/GPFM, ``pretrain/dinov2``): next
to the DINOv2 losses, the student's class and patch tokens of the 2 global crops are mapped
by one head per expert to that expert's tokens of the same crops.

- Head: GPFM's ``DINOHead(nlayers=1)``: Linear(student dim -> 256), L2 normalisation, a
  weight-normalised bias-free Linear(256 -> expert dim); one head per expert, applied to the
  class token and to every patch token (:class:`pipeline.ssl.models.DINOHead` with
  ``layers=1``).
- Class token: ``cls_weight * (1 - cosine)`` (GPFM's ``radio`` loss).
- Patch tokens: the expert's patch grid resized bicubically to the student's, then
  ``patch_weight * (0.9 (1 - cosine) + 0.1 SmoothL1)`` (GPFM's ``FeatureLoss``).
- The student's patch tokens are those of its iBOT-masked forward pass, as in GPFM.

Deviations from GPFM's code, each to serve any expert rather than UNI, Phikon and CONCH
at 224 px with ImageNet statistics:

- each expert gets the global crops re-normalised to its own mean/std (the crops arrive
  normalised with ``data.mean``/``data.std``) and resized to its own input size (GPFM feeds
  the student's crops as they are; a centre crop, as some experts' extraction transform
  has, is not applied: it would break the patch grids' correspondence);
- the patch grids may differ in both sides (GPFM assumes square grids);
- experts are any encoder of ``cpath extract`` with patch tokens (ViTs); their class token is
  the first token after the final norm (for UNI and Phikon the same as GPFM's; CONCH's
  attentional pooler is not available here);
- each device holds every expert whole, in bf16 on GPUs (GPFM shards them with FSDP);
- GPFM's other class-token loss, a KL divergence (not used by its released configs), is not
  implemented. As in GPFM, the heads' last layers are frozen with the DINO head's for
  ``optim.freeze_last_layer_steps`` and the heads are not gradient-clipped.

Experts are not ``nn.Module`` children of the training module: they never receive
gradients, are not in its state dict, its optimizer, DDP's buckets or FSDP's units, and are
moved to the device (bf16 on GPUs) by :meth:`Expert.to`.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.encoders import Encoder, load_encoder
from pipeline.errors import ConfigError
from pipeline.ssl.config import DistillConfig, ExpertConfig
from pipeline.ssl.models import DINOHead

PATCH_COSINE, PATCH_SMOOTH_L1 = 0.9, 0.1  # GPFM's FeatureLoss(alpha, beta)
NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def renormalize(
    images: torch.Tensor,
    data_mean: tuple[float, ...],
    data_std: tuple[float, ...],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    size: int | None = None,
) -> torch.Tensor:
    """``B x 3 x H x W`` crops normalised with ``data_mean``/``data_std`` -> the same crops
    normalised with ``mean``/``std`` (the expert's), resized to ``size`` x ``size`` px
    (bilinear, antialiased when shrinking) if given and different."""
    x = images.float()

    def col(v: tuple[float, ...]) -> torch.Tensor:
        return torch.tensor(v, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)

    x = x * col(data_std) + col(data_mean)  # B x 3 x H x W in [0, 1]
    if size is not None and x.shape[-2:] != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=size < x.shape[-1], align_corners=False
        )
    return (x - col(mean)) / col(std)


def resize_grid(tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``B x N x C`` patch tokens of a row-major ``grid`` (h, w), ``N = h * w`` -> ``B x M x C``
    on a ``size`` (h', w') grid, resized bicubically (GPFM: ``F.interpolate`` bicubic,
    ``align_corners=False``)."""
    b, n, c = tokens.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} tokens do not form a {h} x {w} grid")
    if (h, w) == tuple(size):
        return tokens
    x = tokens.transpose(1, 2).reshape(b, c, h, w)  # B x C x h x w
    x = F.interpolate(x.float(), size=tuple(size), mode="bicubic", align_corners=False)
    return x.flatten(2).transpose(1, 2)  # B x M x C


def cosine_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - cos(student, target)`` over the last dimension, averaged (fp32)."""
    return 1 - F.cosine_similarity(student.float(), target.float(), dim=-1).mean()


def patch_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GPFM's patch-token loss on ``B x N x C`` tokens of the same grid:
    ``0.9 (1 - cosine) + 0.1 SmoothL1`` (``beta = 1``, mean over all elements), fp32."""
    s, t = student.float(), target.float()
    return PATCH_COSINE * cosine_loss(s, t) + PATCH_SMOOTH_L1 * F.smooth_l1_loss(s, t)


def expert_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``B x T x C`` tokens after the final norm of an encoder's network: a timm ViT
    (``forward_features``) or a zoo :class:`~pipeline.encoders.outputs.PooledEncoder` around
    one (timm, or ``transformers``' ``last_hidden_state``)."""
    backbone = getattr(model, "backbone", model)
    if getattr(model, "loader", "timm") == "transformers":
        return backbone(pixel_values=x).last_hidden_state
    return backbone.forward_features(x)


@dataclass
class Expert:
    """A frozen encoder with its weights, as :func:`pipeline.encoders.load_encoder` gives it,
    and how the student's crops are fed to it."""

    cfg: ExpertConfig
    encoder: Encoder
    dim: int
    prefix: int  # class + register tokens before the patch tokens

    @property
    def name(self) -> str:
        return self.cfg.name

    def to(self, device: torch.device | str) -> Expert:
        """On ``device``, in bf16 on GPUs and fp32 elsewhere, in eval mode."""
        device = torch.device(device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.encoder.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.encoder.model.parameters()).device

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, data_mean: tuple, data_std: tuple
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Class token ``B x C``, patch tokens ``B x N x C`` (fp32) and their grid (h, w) for
        ``B x 3 x G x G`` crops normalised with ``data_mean``/``data_std``."""
        enc = self.encoder
        x = renormalize(images, data_mean, data_std, enc.mean, enc.std, enc.input_size)
        dtype = next(enc.model.parameters()).dtype
        tokens = expert_tokens(enc.model, x.to(dtype))  # B x T x C
        if tokens.ndim != 3 or tokens.shape[-1] != self.dim:
            raise ConfigError(
                f"expert '{self.name}' ({enc.name}) gave tokens of shape {tuple(tokens.shape)}, "
                f"not B x T x {self.dim}: distillation needs a ViT expert"
            )
        patches = tokens[:, self.prefix :].float()  # B x N x C
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise ConfigError(
                f"expert '{self.name}' ({enc.name}): {patches.shape[1]} patch tokens after "
                f"{self.prefix} prefix tokens are no square grid"
            )
        return tokens[:, 0].float(), patches, (side, side)


def load_expert(cfg: ExpertConfig, weights_map: str | os.PathLike | None = None) -> Expert:
    """The expert ``cfg.encoder`` loaded as ``cpath extract`` loads its encoder (on the CPU;
    see :meth:`Expert.to`)."""
    if not NAME.match(cfg.name):
        raise ConfigError(
            f"--distill.experts: name '{cfg.name}' of {cfg.encoder}: use letters, digits, - and _"
        )
    if cfg.cls_weight < 0 or cfg.patch_weight < 0 or cfg.cls_weight + cfg.patch_weight <= 0:
        raise ConfigError(
            f"--distill.experts: expert '{cfg.name}' needs cls_weight and patch_weight >= 0, "
            f"not both 0 (got {cfg.cls_weight}, {cfg.patch_weight})"
        )
    encoder = load_encoder(cfg.encoder, weights=cfg.weights, weights_map=weights_map)
    if encoder.random_init:
        raise ConfigError(
            f"--distill.experts: expert '{cfg.name}' ({encoder.name}) has random-init weights; "
            "give its weights (weights: FILE) or an exported encoder folder"
        )
    model = encoder.model
    prefix = getattr(model, "num_prefix_tokens", None)
    if getattr(model, "mode", None) == "mean" or not prefix:
        raise ConfigError(
            f"--distill.experts: expert '{cfg.name}' ({encoder.name}) has no class and patch "
            "tokens; distillation needs a ViT expert"
        )
    dim = encoder.embed_dim // (2 if encoder.output_mode == "cls+mean" else 1)
    return Expert(cfg, encoder, int(dim), int(prefix))


def load_experts(cfg: DistillConfig) -> list[Expert]:
    """Every expert of ``cfg``, with unique names."""
    names = [e.name for e in cfg.experts]
    if len(set(names)) != len(names):
        raise ConfigError(f"--distill.experts: names must be unique, got {names}")
    return [load_expert(e, cfg.weights_map) for e in cfg.experts]


def distill_heads(experts: list[Expert], student_dim: int, bottleneck: int) -> nn.ModuleDict:
    """One GPFM head per expert (``DINOHead(nlayers=1)``): Linear(student dim -> bottleneck),
    L2 normalisation, weight-normalised Linear(bottleneck -> expert dim)."""
    return nn.ModuleDict(
        {
            e.name: DINOHead(student_dim, e.dim, hidden=bottleneck, bottleneck=bottleneck, layers=1)
            for e in experts
        }
    )


def distill_losses(
    experts: list[Expert],
    heads: nn.ModuleDict,
    images: torch.Tensor,
    s_cls: torch.Tensor,
    s_patch: torch.Tensor,
    grid: tuple[int, int],
    data_mean: tuple,
    data_std: tuple,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The weighted distillation terms (``distill_cls/<name>``, ``distill_patch/<name>``) of
    the student's class tokens ``2B x D`` and patch tokens ``2B x N x D`` (on ``grid``) of
    the global crops ``images`` ``2B x 3 x G x G``, and each expert's forward time (ms)."""
    terms, ms = {}, {}
    for expert in experts:
        if expert.device != images.device:
            expert.to(images.device)
        sync = images.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(images.device)
        start = time.perf_counter()
        e_cls, e_patch, e_grid = expert(images, data_mean, data_std)  # 2B x C, 2B x M x C
        if sync:
            torch.cuda.synchronize(images.device)
        ms[expert.name] = 1000 * (time.perf_counter() - start)
        head, cfg = heads[expert.name], expert.cfg
        if cfg.cls_weight > 0:
            terms[f"distill_cls/{expert.name}"] = cfg.cls_weight * cosine_loss(head(s_cls), e_cls)
        if cfg.patch_weight > 0:
            target = resize_grid(e_patch, e_grid, grid)  # 2B x N x C
            terms[f"distill_patch/{expert.name}"] = cfg.patch_weight * patch_loss(
                head(s_patch), target
            )
    return terms, ms
