"""Stain normalization (Macenko, Reinhard, Vahadane) and stain augmentation on torch."""

from pipeline.stain.base import STAIN_METHODS, StainNormalizer, load_normalizer, make_normalizer
from pipeline.stain.macenko import MacenkoNormalizer
from pipeline.stain.reinhard import ReinhardNormalizer
from pipeline.stain.vahadane import VahadaneNormalizer

__all__ = [
    "STAIN_METHODS",
    "MacenkoNormalizer",
    "ReinhardNormalizer",
    "StainNormalizer",
    "VahadaneNormalizer",
    "load_normalizer",
    "make_normalizer",
]
