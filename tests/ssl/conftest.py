"""Labelled tiles of the demo's real textures: carcinoma (tumour) vs skin (normal)."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.demo import SITES
from pipeline.data.synth import stain_shift, to_hed


def texture_tiles(sources: dict, per_class: int = 96, size: int = 64, seed: int = 0):
    """``(N x 3 x size x size uint8, labels, groups)``: 64 um crops at 0.5 mpp (128 px) of the
    carcinoma image (tumour) and the CMU skin scan (normal), each in the stain of a random
    demo site. Groups are the quarters of each image, so cross-validation folds never share
    overlapping crops."""
    rng = np.random.default_rng(seed)
    carcinoma = np.asarray(Image.open(sources["carcinoma"]).convert("RGB"))[
        ::2, ::2
    ]  # 0.25 -> 0.5 mpp
    with openslide.OpenSlide(str(sources["cmu"])) as slide:
        skin = np.asarray(slide.read_region((300, 600), 0, (1600, 2000)).convert("RGB"))
    images, labels, groups = [], [], []
    for label, image in (("tumor", carcinoma), ("normal", skin)):
        h, w = image.shape[:2]
        for i in range(per_class):
            quarter = i % 4
            y0 = (quarter // 2) * (h // 2)
            x0 = (quarter % 2) * (w // 2)
            y = y0 + rng.integers(0, h // 2 - 128)
            x = x0 + rng.integers(0, w // 2 - 128)
            crop = image[y : y + 128, x : x + 128]
            site = SITES[rng.integers(len(SITES))]
            crop = stain_shift(to_hed(crop), site.stain)
            images.append(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1))
            labels.append(label)
            groups.append(f"{label}-{quarter}")
    batch = torch.stack(images).float()
    batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True)
    return batch.round().clamp(0, 255).to(torch.uint8), np.array(labels), np.array(groups)


@pytest.fixture(scope="session")
def texture_probe(sources):
    return texture_tiles(sources)


TINY_VIT = {"img_size": 16, "patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}


@pytest.fixture
def tiny_module():
    """A factory of tiny :class:`DINOv2Module` (ViT of 1 block, 16 wide, 16 px crops, 16
    prototypes) that trains a step in milliseconds; keyword arguments override the loss,
    model and optimizer configs (``loss={...}``, ``model={...}``, ``optim={...}``). Torch runs on one thread meanwhile: ops
    this small are many times slower on threads that share busy cores."""
    from pipeline.ssl.config import LossConfig, ModelConfig, OptimConfig
    from pipeline.ssl.module import DINOv2Module

    def make(
        max_steps: int = 10,
        loss: dict | None = None,
        model: dict | None = None,
        optim: dict | None = None,
    ):
        model_cfg = ModelConfig(
            **{
                "arch": "vit_tiny_patch16_224",
                "arch_kwargs": dict(TINY_VIT),
                "drop_path_rate": 0.0,
                "prototypes": 16,
                "head_hidden": 16,
                "head_bottleneck": 8,
                "head_layers": 2,
                **(model or {}),
            }
        )
        optim = OptimConfig(**{"warmup_steps": 2, "freeze_last_layer_steps": 0, **(optim or {})})
        return DINOv2Module.from_configs(model_cfg, LossConfig(**(loss or {})), optim, max_steps)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make
    torch.set_num_threads(threads)
