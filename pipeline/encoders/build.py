"""Build zoo models (:mod:`pipeline.encoders.zoo`) offline and load their published weights.

``build_zoo_model`` gives the network at random init (for tests, parameter counts on the
``meta`` device, or before loading weights); ``load_zoo_encoder`` is what
``load_encoder("KEY[:MODE]", weights=FILE)`` does: build, load the user's local weights
strictly, wrap with the spec's transform. There is no random-init fallback: without weights
it fails and says where to get them.

Published layouts read: a timm state dict; Meta's DINOv2 training checkpoint (GPFM); a Swin
checkpoint of timm <= 0.5 (CTransPath); a ``transformers`` folder (``config.json`` and
weights, as ``save_pretrained`` and the Hub write it: its own config is used, and must give
the spec's embedding dim) or that folder's weights file alone (the spec's config is used).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch
from torch import nn

from pipeline.encoders.core import Encoder, read_state_dict
from pipeline.encoders.layers import swin_v1_state
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
    """The spec's network at random init, without head (``depth``: fewer blocks, for tests
    of the giant models)."""
    if model.loader == "external":
        raise ConfigError(f"{model.key}: {model.install}")
    if model.loader == "transformers":
        return build_transformers(model, depth)
    import timm

    from pipeline.encoders import layers

    kwargs = dict(model.kwargs)
    if isinstance(kwargs.get("mlp_layer"), str):  # specs name classes: SwiGLUPacked, SiLU
        kwargs["mlp_layer"] = getattr(timm.layers, kwargs["mlp_layer"])
    if isinstance(kwargs.get("act_layer"), str):
        kwargs["act_layer"] = getattr(nn, kwargs["act_layer"])
    if isinstance(kwargs.get("embed_layer"), str):
        kwargs["embed_layer"] = getattr(layers, kwargs["embed_layer"])
    if depth is not None and model.arch.startswith("swin"):
        kwargs["depths"] = (2, 2, depth, 2)  # Swin: stage 3 holds most blocks
    elif depth is not None and model.truncate is None:
        kwargs["depth"] = depth  # transformer blocks
    elif depth is not None:
        kwargs["layers"] = [depth] * 4  # ResNet: blocks per stage
    net = timm.create_model(model.arch, pretrained=False, num_classes=0, **kwargs)
    if model.truncate == "layer3":
        net.layer4 = nn.Identity()  # forward_features ends at layer3: B x 1024 x H/16 x W/16
    return net


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(
            "this zoo model is a `transformers` model: pip install 'cpath-pipeline[zoo]' "
            "(or pip install transformers)"
        ) from exc
    return transformers


def build_transformers(model: ModelSpec, depth: int | None = None) -> nn.Module:
    """The spec's ``transformers`` model class at random init from the spec's config (no
    pooling head: the output modes pool its tokens)."""
    cls = getattr(_transformers(), model.arch)
    kwargs = dict(model.kwargs)
    if depth is not None:
        kwargs["num_hidden_layers"] = depth
    extra = {"add_pooling_layer": False} if model.arch == "ViTModel" else {}
    return cls(cls.config_class(**kwargs), **extra).eval()


def prefix_tokens(model: ModelSpec, backbone: nn.Module) -> int:
    """CLS + register tokens before the patch tokens, as the built network has them."""
    if model.loader == "transformers":
        return 1 + int(getattr(backbone.config, "num_register_tokens", 0) or 0)
    return getattr(backbone, "num_prefix_tokens", 0)


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
    return pooled(model, mode, backbone)


def pooled(model: ModelSpec, mode: str, backbone: nn.Module) -> PooledEncoder:
    """``backbone`` with the output mode's pooling, its prefix tokens checked against the
    spec (a wrong spec or a foreign config would otherwise average registers in)."""
    prefix = prefix_tokens(model, backbone)
    if prefix != model.num_prefix_tokens:
        raise ValueError(
            f"{model.key}: the network has {prefix} prefix tokens, the spec says "
            f"{model.num_prefix_tokens}"
        )
    return PooledEncoder(backbone, mode, prefix, model.loader).eval()


def dinov2_teacher_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Meta DINOv2 training checkpoint's teacher as a timm state dict (FM_ZOO.md, GPFM):
    ``["teacher"]`` (unwrapped by :func:`read_state_dict`), ``backbone.`` stripped, chunked
    ``blocks.N.M`` flattened to ``blocks.M``, the SwiGLU feed-forward's ``mlp.w12`` /
    ``mlp.w3`` named as timm's ``mlp.fc1`` / ``mlp.fc2`` (ViT-g), ``mask_token`` and the
    ``dino_head`` / ``ibot_head`` dropped. A plain timm state dict passes through unchanged."""
    out = {}
    for name, value in state.items():
        if name.startswith(("dino_head.", "ibot_head.")):
            continue
        name = name.removeprefix("backbone.")
        if name == "mask_token":
            continue
        name = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", name)
        out[re.sub(r"^(blocks\.\d+\.mlp)\.w(12|3)\.", _swiglu_name, name)] = value
    return out


def _swiglu_name(match: re.Match) -> str:
    return f"{match[1]}.{'fc1' if match[2] == '12' else 'fc2'}."


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
    """``KEY[:MODE]`` with its weights (the spec's published layout: a file, or for
    ``transformers`` models their folder) from ``weights``, the weights map or the Hugging
    Face cache (:func:`pipeline.encoders.weights.find_weights`). ``depth`` is for tests."""
    model, mode = parse_zoo_name(text)
    if kwargs:
        raise ConfigError(f"{model.key} takes no options {sorted(kwargs)}")
    if model.loader == "external":
        raise ConfigError(f"{model.key}: {model.install}")
    weights = find_weights(model, weights, weights_map)
    if model.loader == "transformers":
        folder = transformers_folder(weights)
        net = pooled(model, mode, load_transformers(model, weights, depth))
        digest = folder_sha256(folder) if folder is not None else sha256_file(weights)
        return zoo_encoder(model, mode, net, digest)
    if weights.is_dir():
        raise ConfigError(
            f"{weights}: a folder, but {model.key} takes a weights file "
            f"({model.checkpoint} layout) or a transformers folder with config.json"
        )
    net = build_zoo_model(model.key, mode=mode, depth=depth)
    state = published_state(model, read_state_dict(weights), net.backbone)
    try:
        net.backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).splitlines()[:4])
        raise PipelineError(
            f"{weights}: weights do not match {model.key} ({model.arch}): {first}; check that "
            f"the file holds the weights of {model.hub_id}."
        ) from exc
    return zoo_encoder(model, mode, net, sha256_file(weights))


def published_state(
    model: ModelSpec, state: dict[str, torch.Tensor], backbone: nn.Module
) -> dict[str, torch.Tensor]:
    """A published state dict in the layout of the spec's built ``backbone``."""
    if model.checkpoint == "dinov2-teacher":
        state = dinov2_teacher_state(state)
    elif model.checkpoint == "swin-v1":
        state = swin_v1_state({k: v for k, v in state.items() if "head." not in k}, backbone)
    if model.truncate is not None:
        state = truncated_state(state)
    return state


def transformers_folder(path: Path) -> Path | None:
    """The ``save_pretrained`` folder of ``path`` (the folder itself, or the folder of a
    weights file beside its ``config.json``, as in the Hugging Face cache), else None."""
    folder = path if path.is_dir() else path.parent
    return folder if (folder / "config.json").is_file() else None


@contextlib.contextmanager
def _quiet_transformers():
    """No load report or progress bar from ``transformers``: a mismatch raises instead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def load_transformers(model: ModelSpec, weights: Path, depth: int | None = None) -> nn.Module:
    """A ``transformers`` zoo model from a local ``save_pretrained`` folder (its own config;
    the authors' code of ``remote_code`` specs only from that folder) or from a weights file
    alone (the spec's config). No network. Every parameter must come from the weights (a
    missing one would otherwise be left at random init); unused ones only for a pooler."""
    transformers = _transformers()
    folder = transformers_folder(weights)
    extra = {"add_pooling_layer": False} if model.arch == "ViTModel" else {}
    if folder is not None:
        cls = transformers.AutoModel if model.remote_code else getattr(transformers, model.arch)
        args: tuple = (str(folder),)
        extra.update(local_files_only=True, trust_remote_code=model.remote_code)
    else:
        if weights.is_dir():
            raise ConfigError(f"{weights}: no config.json in this folder of {model.key}")
        cls = getattr(transformers, model.arch)
        config = build_transformers(model, depth).config
        args = (None,)
        extra.update(config=config, state_dict=read_state_dict(weights))
    try:
        with _quiet_transformers():
            net, info = cls.from_pretrained(*args, output_loading_info=True, **extra)
    except (OSError, ValueError, ImportError, RuntimeError) as exc:
        code = " and the authors' *.py files" if model.remote_code else ""
        raise PipelineError(
            f"{weights}: cannot load {model.key} from it ({type(exc).__name__}: {exc}); a "
            f"folder must hold the whole {model.hub_id} repo: config.json, the weights{code}"
        ) from exc
    unexpected = [k for k in info["unexpected_keys"] if "pooler." not in k]
    wrong = sorted(info["missing_keys"]) + sorted(info["mismatched_keys"]) + sorted(unexpected)
    if wrong:
        raise PipelineError(
            f"{weights}: weights do not match {model.key} ({model.arch}): missing, mismatched "
            f"or unexpected {', '.join(map(str, wrong[:5]))}{' ...' if len(wrong) > 5 else ''}; "
            f"check that it holds the weights of {model.hub_id}."
        )
    dim = getattr(net.config, "hidden_size", None)
    width = model.modes[model.default_mode] // (2 if model.default_mode == "cls+mean" else 1)
    if dim != width:
        raise PipelineError(
            f"{weights}: its config gives hidden size {dim}, {model.key} has {width}; check "
            f"that it holds {model.hub_id}"
        )
    return net.eval()


def folder_sha256(folder: Path) -> str:
    """SHA-256 of a model folder's weights files (safetensors or torch), in name order."""
    import hashlib

    files = sorted(
        p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")
    )
    if not files:
        raise PipelineError(f"{folder}: no weights file (*.safetensors or *.bin) in it")
    if len(files) == 1:
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for file in files:
        digest.update(sha256_file(file).encode())
    return digest.hexdigest()


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
