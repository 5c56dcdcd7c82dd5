"""Build zoo models (:mod:`pipeline.encoders.zoo`) offline and load their published weights.

``build_zoo_model`` gives the network at random init (for tests, parameter counts on the
``meta`` device, or before loading weights); ``load_zoo_encoder`` is what
``load_encoder("KEY[:MODE]", weights=FILE)`` does: build, load the user's local weights
strictly, wrap with the spec's transform. There is no random-init fallback: without weights
it fails and says where to get them.
"""

from __future__ import annotations

import os
import re

import torch
from torch import nn

from pipeline.encoders.core import Encoder, read_state_dict
from pipeline.encoders.outputs import PooledEncoder
from pipeline.encoders.weights import find_weights
from pipeline.encoders.zoo import ModelSpec, spec
from pipeline.errors import ConfigError, PipelineError
from pipeline.io import sha256_file


def zoo_spec(name: str) -> ModelSpec:
    """The spec of a zoo key or alias, or a ConfigError listing the keys."""
    found = spec(name)
    if found is None:
        from pipeline.encoders.zoo import specs

        keys = ", ".join(s.key for s in specs())
        raise ConfigError(f"unknown zoo encoder '{name}': one of {keys}")
    return found


def parse_zoo_name(text: str) -> tuple[ModelSpec, str]:
    """``KEY`` or ``KEY:MODE`` -> (spec, mode); the mode defaults to the spec's."""
    name, _, mode = text.partition(":")
    model = zoo_spec(name)
    mode = mode or model.default_mode
    if mode not in model.modes:
        raise ConfigError(
            f"{model.key} has no output mode '{mode}': one of {', '.join(model.modes)}"
        )
    return model, mode


def build_backbone(model: ModelSpec, depth: int | None = None) -> nn.Module:
    """The spec's timm network at random init, without head (``depth``: fewer blocks, for
    tests of the giant models)."""
    import timm

    kwargs = dict(model.kwargs)
    if isinstance(kwargs.get("mlp_layer"), str):  # specs name classes: SwiGLUPacked, SiLU
        kwargs["mlp_layer"] = getattr(timm.layers, kwargs["mlp_layer"])
    if isinstance(kwargs.get("act_layer"), str):
        kwargs["act_layer"] = getattr(nn, kwargs["act_layer"])
    if depth is not None and model.truncate is None:
        kwargs["depth"] = depth  # transformer blocks
    elif depth is not None:
        kwargs["layers"] = [depth] * 4  # ResNet: blocks per stage
    net = timm.create_model(model.arch, pretrained=False, num_classes=0, **kwargs)
    if model.truncate == "layer3":
        net.layer4 = nn.Identity()  # forward_features ends at layer3: B x 1024 x H/16 x W/16
    return net


def build_zoo_model(
    key_or_alias: str,
    *,
    mode: str | None = None,
    depth: int | None = None,
    device: str | torch.device | None = None,
) -> PooledEncoder:
    """The zoo model ``key_or_alias`` at random init, images ``B x 3 x S x S`` -> ``B x D``
    in ``mode`` (default: the spec's). ``device="meta"`` allocates nothing (parameter
    counts); ``depth`` shrinks the transformer (or each ResNet stage) for tests."""
    model, mode = parse_zoo_name(f"{key_or_alias}:{mode}" if mode else key_or_alias)
    with torch.device(device or "cpu"):
        backbone = build_backbone(model, depth)
    prefix = getattr(backbone, "num_prefix_tokens", 0)  # CLS + registers, as timm counts
    if prefix != model.num_prefix_tokens:
        raise ValueError(
            f"{model.key}: timm gives {prefix} prefix tokens, the spec says "
            f"{model.num_prefix_tokens}"
        )
    return PooledEncoder(backbone, mode, prefix).eval()


def dinov2_teacher_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Meta DINOv2 training checkpoint's teacher as a timm state dict (FM_ZOO.md, GPFM):
    ``["teacher"]`` (unwrapped by :func:`read_state_dict`), ``backbone.`` stripped, chunked
    ``blocks.N.M`` flattened to ``blocks.M``, ``mask_token`` and the ``dino_head`` /
    ``ibot_head`` dropped. A plain timm state dict passes through unchanged."""
    out = {}
    for name, value in state.items():
        if name.startswith(("dino_head.", "ibot_head.")):
            continue
        name = name.removeprefix("backbone.")
        if name == "mask_token":
            continue
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", name)] = value
    return out


def truncated_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full ResNet state dict (timm or torchvision names) without ``layer4`` and ``fc``."""
    return {k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))}


def load_zoo_encoder(
    text: str,
    weights: str | os.PathLike | None = None,
    depth: int | None = None,
    weights_map: str | os.PathLike | None = None,
    **kwargs,
) -> Encoder:
    """``KEY[:MODE]`` with its weights (timm state dict, or the spec's published checkpoint
    layout; safetensors or torch) from ``weights``, the weights map or the Hugging Face
    cache (:func:`pipeline.encoders.weights.find_weights`). ``depth`` is for tests only."""
    model, mode = parse_zoo_name(text)
    if kwargs:
        raise ConfigError(f"{model.key} takes no options {sorted(kwargs)}")
    weights = find_weights(model, weights, weights_map)
    net = build_zoo_model(model.key, mode=mode, depth=depth)
    state = read_state_dict(weights)
    if model.checkpoint == "dinov2-teacher":
        state = dinov2_teacher_state(state)
    if model.truncate is not None:
        state = truncated_state(state)
    try:
        net.backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).splitlines()[:4])
        raise PipelineError(
            f"{weights}: weights do not match {model.key} ({model.arch}): {first}; check that "
            f"the file holds the weights of {model.hub_id}."
        ) from exc
    return zoo_encoder(model, mode, net, sha256_file(weights))


def zoo_encoder(
    model: ModelSpec, mode: str, net: nn.Module, weights_sha256: str | None = None
) -> Encoder:
    """``net`` as an :class:`Encoder` named ``KEY:MODE`` that feeds it the spec's transform
    (resize, crop, mean/std) and reports the mode's dim."""
    return Encoder(
        model=net.eval(),
        name=f"{model.key}:{mode}",
        embed_dim=model.modes[mode],
        input_size=model.input_size,
        mean=model.mean,
        std=model.std,
        weights_sha256=weights_sha256,
        config={"zoo": model.key, "hub_id": model.hub_id, "arch": model.arch},
        resize_size=model.resize_size,
        interpolation=model.interpolation,
        center_crop=model.center_crop,
        key=model.key,
        output_mode=mode,
    )
