"""Export the teacher backbone of a pretraining checkpoint as a stand-alone timm encoder.

Writes ``model.safetensors`` (the plain timm state dict of the EMA teacher, which
DINOv2 evaluates) and ``config.json`` naming the timm architecture and its arguments.
Both of these load the result::

    pipeline.encoders.load_encoder("models/run/encoder")
    timm.create_model(arch, pretrained=True, **model_args,
                      pretrained_cfg_overlay=dict(file=".../model.safetensors", num_classes=0))
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm
import torch

import pipeline
from pipeline.encoders import IMAGENET_MEAN, IMAGENET_STD, load_weights
from pipeline.errors import PipelineError
from pipeline.io import atomic_path, atomic_write_text, sha256_file
from pipeline.ssl.config import DataConfig, ModelConfig

PREFIX = "teacher.backbone.vit."


def read_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated or foreign files raise many types
        raise PipelineError(
            f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def save_encoder(
    weights: dict,
    arch: str,
    model_args: dict,
    out: str | os.PathLike,
    input_size: int = 224,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    extra: dict | None = None,
) -> Path:
    """Write ``out/model.safetensors`` (checked to load strictly into ``arch``) and
    ``out/config.json``; the folder is what :func:`pipeline.encoders.load_encoder` reads."""
    from safetensors.torch import save_file

    weights = {k: v.detach().contiguous().clone() for k, v in weights.items()}
    vit = timm.create_model(arch, pretrained=False, **model_args)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "model.safetensors"
    with atomic_path(target) as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt", "architecture": arch})
        load_weights(vit, tmp)  # the file loads strictly into the named architecture
    config = {
        "architecture": arch,
        "model_args": model_args,
        "num_features": int(vit.num_features),
        "patch_size": int(vit.patch_embed.patch_size[0]) if hasattr(vit, "patch_embed") else None,
        "num_prefix_tokens": int(getattr(vit, "num_prefix_tokens", 0)),
        "input_size": int(input_size),
        "mean": list(mean),
        "std": list(std),
        "weights_sha256": sha256_file(target),
        "package_version": pipeline.__version__,
        **(extra or {}),
    }
    atomic_write_text(out / "config.json", json.dumps(config, indent=1))
    return out


def stain_norm_record(source: str | os.PathLike, checkpoint: str | os.PathLike = "") -> dict:
    """What an exported encoder records of the stain normalizer its tiles were normalised
    with (``--data.stain_norm``): its ``method`` and ``params`` (so the folder is complete
    without the file), where it came from and the digest of its canonical JSON.
    ``cpath extract`` applies it by default."""
    from pipeline.stain.presets import body_sha256, normalizer_body

    try:
        body = normalizer_body(source)
    except PipelineError as exc:
        raise PipelineError(
            f"{checkpoint}: its run normalised tiles with {source}, which cannot be read now "
            f"({exc}); put the file back to export the encoder with its normalizer"
        ) from exc
    return {**body, "source": str(source), "sha256": body_sha256(body)}


def export_encoder(
    checkpoint: str | os.PathLike, out: str | os.PathLike, extra: dict | None = None
) -> Path:
    """Write the teacher backbone of a pretraining checkpoint as an encoder folder ``out``."""
    ckpt = read_checkpoint(checkpoint)
    try:
        hp, state = ckpt["hyper_parameters"], ckpt["state_dict"]
        # checkpoints of before LayerScale became a field had none
        model = ModelConfig(**{"layerscale": None, **hp["model"]})
    except (KeyError, TypeError) as exc:
        raise PipelineError(f"{checkpoint}: not a `cpath pretrain` checkpoint (no {exc})") from exc
    weights = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not weights:
        raise PipelineError(f"{checkpoint}: holds no teacher backbone weights")
    model_args = {"num_classes": 0, "dynamic_img_size": True, **model.timm_kwargs()}
    data = DataConfig(**dict(hp.get("data") or {}))
    meta = {
        "step": int(ckpt.get("global_step", 0)),
        "samples_seen": int(ckpt.get("samples_seen", 0)),
        "source_checkpoint": str(Path(checkpoint).resolve()),
        **(extra or {}),
    }
    if data.stain_norm and "stain_norm" not in meta:
        meta["stain_norm"] = stain_norm_record(data.stain_norm, checkpoint)
    return save_encoder(
        weights, model.arch, model_args, out, data.global_size, data.mean, data.std, meta
    )
