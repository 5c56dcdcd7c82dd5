"""Frozen encoders by name: exported pretraining folders, timm models, Hugging Face Hub models.

``load_encoder(spec)`` returns an :class:`Encoder`: the model (images -> ``B x D``
embeddings, in eval mode) plus what a caller needs to feed it: input size and the
normalisation mean/std, the embedding size, and the SHA-256 of the weights. ``spec`` is

- a folder written by ``cpath pretrain`` (``model.safetensors`` + ``config.json``),
- ``timm:<architecture>`` (local weights with ``weights=FILE``; without them random init,
  logged as a warning and marked ``weights: random`` wherever its features go),
- ``hf-hub:<org>/<name>`` through timm's own hub loader (needs network access),
- ``random:<exported folder>``: the same architecture and input at random init (seed 0),
  the baseline a pretrained encoder is compared with,
- ``KEY`` or ``KEY:MODE``: a public pathology foundation model of the zoo
  (:mod:`pipeline.encoders.zoo`), with its authors' transform and output mode; its weights
  come from ``weights=FILE`` only (never a random-init fallback).

A suffix ``@SIZE`` on an exported folder, ``timm:``, ``hf-hub:`` or ``random:`` spec
(``runs/pretrain/encoder@392``) feeds the encoder ``SIZE`` px inputs instead of its own
size, without training: a ViT's patch-grid position embeddings are resampled bicubically to
the new grid (timm's ``set_input_size``), the class and register positions unchanged, as
for the high-resolution post-training of Midnight (Karasikov et al., 2025), whose baseline
this is. The encoder is named with the suffix.

A new source is one function registered with :func:`register_encoder_source`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.encoders.zoo import spec as zoo_spec
from pipeline.errors import ConfigError, PipelineError
from pipeline.io import sha256_file

log = logging.getLogger(__name__)
ENCODER_SOURCES: dict[str, Callable[..., Encoder]] = {}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INPUT_SIZE_SUFFIX = re.compile(r"^(?P<spec>.+)@(?P<size>\d+)$")


@dataclass
class Encoder:
    """A frozen encoder and how to feed it."""

    model: nn.Module
    name: str
    embed_dim: int
    input_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    weights_sha256: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False
    random_init: bool = False  # no trained weights: a baseline, never a feature extractor
    resize_size: int | None = None  # shorter side before a centre crop to input_size
    interpolation: str = "bilinear"  # of the resize to resize_size
    center_crop: bool = False
    key: str | None = None  # zoo key (pipeline.encoders.zoo), None for other sources
    output_mode: str | None = None  # zoo output mode, computed by the model itself

    @property
    def load_size(self) -> int:
        """Side (px) to resize square tiles to before :meth:`normalize` (which then only
        crops): ``resize_size`` where the encoder has one, else ``input_size``."""
        return self.resize_size or self.input_size

    @property
    def weights(self) -> str:
        """``random`` (random init) or ``pretrained``, as feature files and leaderboards say."""
        return "random" if self.random_init else "pretrained"

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` uint8 -> float at the encoder's input size, normalised with its
        mean and std (tiles of another size are resized, antialiased)."""
        x = images.float() / 255
        if self.resize_size is not None:
            x = resize_crop(
                x, self.resize_size, self.interpolation, self.center_crop, self.input_size
            )
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x,
                size=(self.input_size, self.input_size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            ).clamp_(0, 1)
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def embed(self, images: torch.Tensor, pooling: str = "cls") -> torch.Tensor:
        """``B x D`` embeddings of ``B x 3 x H x W`` uint8 tiles (call under inference_mode).

        ``cls``: the model's own pooled output (the class token for timm ViTs); ``mean``:
        the mean of the patch tokens; ``cls+mean``: both, concatenated (``B x 2D``).
        """
        if self.output_mode is not None and pooling != "cls":
            raise ConfigError(
                f"{self.name} computes its output mode itself; choose it in the encoder name "
                f"({self.key}:MODE) and leave --pooling at cls"
            )
        x = self.normalize(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if pooling == "cls":
            return self.model(x)
        if not hasattr(self.model, "num_prefix_tokens"):
            raise ConfigError(f"--pooling {pooling} needs a ViT; {self.name} has no patch tokens")
        tokens = self.model.forward_features(x)  # B x T x D
        mean = tokens[:, self.model.num_prefix_tokens :].mean(dim=1)  # B x D
        if pooling == "mean":
            return mean
        if pooling == "cls+mean":
            return torch.cat([tokens[:, 0], mean], dim=-1)
        raise ConfigError(f"unknown pooling '{pooling}': cls, mean or cls+mean")

    def output_dim(self, pooling: str = "cls") -> int:
        return self.embed_dim * (2 if pooling == "cls+mean" else 1)


def resize_crop(
    x: torch.Tensor, size: int, interpolation: str, crop: bool, crop_size: int
) -> torch.Tensor:
    """``B x 3 x H x W`` float in [0, 1], shorter side resized to ``size`` (antialiased,
    clamped to [0, 1]), then centre-cropped to ``crop_size`` if ``crop``: torchvision's
    ``Resize(size, interpolation, antialias=True)`` + ``CenterCrop(crop_size)``."""
    h, w = x.shape[-2:]
    if min(h, w) != size:
        short, long = (h, w) if h <= w else (w, h)
        other = int(size * long / short)  # torchvision's rounding (truncation)
        out = (size, other) if h <= w else (other, size)
        x = F.interpolate(
            x, size=out, mode=interpolation, antialias=True, align_corners=False
        ).clamp_(0, 1)
    if crop:
        h, w = x.shape[-2:]
        top, left = int(round((h - crop_size) / 2.0)), int(round((w - crop_size) / 2.0))
        x = x[..., top : top + crop_size, left : left + crop_size]  # B x 3 x crop x crop
    return x


def register_encoder_source(prefix: str) -> Callable:
    def add(fn: Callable) -> Callable:
        ENCODER_SOURCES[prefix] = fn
        return fn

    return add


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (``state_dict``/``model`` keys unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: weights file not found")
    try:
        if ".safetensors" in path.name:
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise many types for corrupt files
        raise PipelineError(
            f"{path}: cannot read the weights ({type(exc).__name__}: {exc})"
        ) from exc
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict strictly, with an error naming the mismatch and the file."""
    state = read_state_dict(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:4]
        raise PipelineError(
            f"{path}: weights do not match the architecture ({' '.join(first)}); check that "
            "the encoder name matches the weights."
        ) from exc


def _timm_encoder(
    name: str, model: nn.Module, weights: str | None = None, random_init: bool = False, **config
) -> Encoder:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = config.pop("input_size", None) or (cfg.get("input_size") or (3, 224, 224))[-1]
    return Encoder(
        model=model.eval(),
        name=name,
        embed_dim=int(model.num_features),
        input_size=int(size),
        mean=tuple(config.pop("mean", None) or cfg.get("mean") or IMAGENET_MEAN),
        std=tuple(config.pop("std", None) or cfg.get("std") or IMAGENET_STD),
        weights_sha256=sha256_file(weights) if weights else None,
        config=config,
        random_init=random_init,
    )


@register_encoder_source("timm")
def _from_timm(name: str, weights: str | os.PathLike | None = None, **kwargs) -> Encoder:
    from pipeline.ssl.models import create_vit_or_any

    model = create_vit_or_any(name, **kwargs)
    if weights:
        load_weights(model, weights)
    return _timm_encoder(
        f"timm:{name}", model, str(weights) if weights else None, random_init=not weights
    )


@register_encoder_source("hf-hub")
def _from_hub(name: str, weights: str | os.PathLike | None = None, **kwargs) -> Encoder:
    import timm

    if weights:
        raise ConfigError(
            f"hf-hub:{name} loads its weights from the Hub; for local weights use "
            "timm:<arch> --encoder_weights FILE."
        )

    try:
        model = timm.create_model(f"hf-hub:{name}", pretrained=True, num_classes=0, **kwargs)
    except Exception as exc:  # network, authentication, missing repo
        raise PipelineError(
            f"hf-hub:{name}: cannot load from the Hugging Face Hub ({type(exc).__name__}: "
            f"{exc}); check network access and HF_TOKEN, or download the weights and use "
            "timm:<arch> with --encoder_weights FILE."
        ) from exc
    return _timm_encoder(f"hf-hub:{name}", model)


def load_exported(
    folder: str | os.PathLike,
    random_init: bool = False,
    weights: str | os.PathLike | None = None,
) -> Encoder:
    """An encoder folder written by ``cpath pretrain`` (``config.json`` + ``model.safetensors``);
    with ``random_init``, its architecture with fresh weights (seed 0) instead; with
    ``weights``, its architecture with the weights of that file (same architecture)."""
    import timm

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        arch, model_args = config["architecture"], dict(config.get("model_args", {}))
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise PipelineError(f"{folder}: not an exported encoder (config.json: {exc})") from exc
    if random_init and weights:
        raise ConfigError("random:<folder> takes no weights")
    weights = None if random_init else Path(weights or folder / "model.safetensors")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False, **model_args)
    if weights is not None:
        load_weights(model, weights)
    return _timm_encoder(
        f"random:{folder}" if random_init else str(folder),
        model,
        str(weights) if weights else None,
        random_init,
        input_size=config.get("input_size"),
        mean=config.get("mean"),
        std=config.get("std"),
        **{"export": config},
    )


@register_encoder_source("random")
def _random_like(folder: str, weights: str | os.PathLike | None = None, **kwargs) -> Encoder:
    return load_exported(folder, random_init=True, weights=weights)


def spec_weights(spec: str | os.PathLike, weights: str | os.PathLike | None = None) -> str:
    """``random`` or ``pretrained``: what :func:`load_encoder` would give for ``spec``,
    without loading it (``random:<folder>``, and ``timm:<arch>`` without ``weights``, are
    random init)."""
    prefix, sep, _ = split_input_size(os.fspath(spec))[0].partition(":")
    random_init = sep and (prefix == "random" or (prefix == "timm" and not weights))
    return "random" if random_init else "pretrained"


def split_input_size(spec: str) -> tuple[str, int | None]:
    """``SPEC@SIZE`` -> ``(SPEC, SIZE)``; ``(spec, None)`` without the suffix, or for a path
    that exists under the whole name."""
    match = INPUT_SIZE_SUFFIX.match(spec)
    if match is None or Path(spec).exists():
        return spec, None
    return match["spec"], int(match["size"])


def set_input_size(encoder: Encoder, size: int) -> Encoder:
    """``encoder`` fed ``size`` px inputs (the ``@SIZE`` suffix of :func:`load_encoder`): a
    ViT's patch-grid position embeddings resampled bicubically to the new grid by timm's
    ``set_input_size`` (class and register positions unchanged); a convolutional network
    only gets the new size. Renamed ``NAME@SIZE``."""
    model = encoder.model
    where = f"{encoder.name}@{size}"
    if encoder.key is not None:
        raise ConfigError(
            f"{where}: a zoo encoder keeps its authors' input size and transform; @SIZE is "
            "for exported folders and timm:, hf-hub: or random: encoders"
        )
    if size < 1:
        raise ConfigError(f"{where}: the input size must be at least 1 px")
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:
        patch = int(patch_embed.patch_size[0])
        if size % patch:
            raise ConfigError(
                f"{where}: {size} px is no multiple of the patch size {patch}; "
                f"try {max(patch, round(size / patch) * patch)}"
            )
        if not hasattr(model, "set_input_size"):
            raise ConfigError(f"{where}: this model cannot change its input size")
        model.set_input_size(img_size=(size, size))  # pos_embed: 1 x (prefix + h*w) x D
    encoder.config["native_input_size"] = encoder.input_size
    encoder.input_size, encoder.name = int(size), where
    return encoder


def load_encoder(
    spec: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    weights_map: str | os.PathLike | None = None,
    **kwargs,
) -> Encoder:
    """The encoder named by ``spec`` (see the module docstring), in eval mode on ``device``.
    ``weights_map``: a YAML weights map for zoo models (default ``$CPATH_WEIGHTS``; see
    :mod:`pipeline.encoders.weights`); other encoders do not use it."""
    text, size = split_input_size(os.fspath(spec))
    prefix, sep, name = text.partition(":")
    if size is not None and not (sep and prefix in ENCODER_SOURCES) and not Path(text).is_dir():
        raise ConfigError(
            f"{text}@{size}: @SIZE is for exported folders and timm:, hf-hub: or random: "
            "encoders; a zoo encoder keeps its authors' input size and transform"
        )
    if sep and prefix in ENCODER_SOURCES:
        encoder = ENCODER_SOURCES[prefix](name, weights=weights, **kwargs)
    elif Path(text).is_dir():
        encoder = load_exported(text, weights=weights)
    elif zoo_spec(prefix) is not None:
        from pipeline.encoders.build import load_zoo_encoder

        encoder = load_zoo_encoder(text, weights=weights, weights_map=weights_map, **kwargs)
    else:
        known = ", ".join(f"{p}:<name>" for p in sorted(ENCODER_SOURCES))
        raise ConfigError(
            f"unknown encoder '{text}': expected an exported folder (with config.json), "
            f"one of {known}, or a zoo key (`cpath encoders` lists them)"
        )
    if encoder.random_init:
        log.warning(
            "encoder %s has random-init weights: its features are a baseline for comparison, "
            "not a pretrained encoder's (pass --encoder_weights FILE, or an exported folder)",
            encoder.name,
        )
    if size is not None:
        set_input_size(encoder, size)
    encoder.model.to(device).requires_grad_(False)
    if torch.device(device).type == "cuda":
        encoder.model.to(memory_format=torch.channels_last)
        encoder.channels_last = True
    return encoder
