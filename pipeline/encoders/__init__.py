"""Frozen encoders: exported pretraining folders, timm and Hub models, and the zoo of public
pathology foundation models (see :mod:`pipeline.encoders.core` and
:mod:`pipeline.encoders.zoo`)."""

from pipeline.encoders.build import build_zoo_model, load_zoo_encoder
from pipeline.encoders.core import (
    ENCODER_SOURCES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Encoder,
    load_encoder,
    load_exported,
    load_weights,
    read_state_dict,
    register_encoder_source,
    spec_weights,
)
from pipeline.encoders.outputs import pool_tokens
from pipeline.encoders.zoo import ZOO, ModelSpec

__all__ = [
    "ENCODER_SOURCES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ZOO",
    "Encoder",
    "ModelSpec",
    "build_zoo_model",
    "load_encoder",
    "load_exported",
    "load_weights",
    "load_zoo_encoder",
    "pool_tokens",
    "read_state_dict",
    "register_encoder_source",
    "spec_weights",
]
