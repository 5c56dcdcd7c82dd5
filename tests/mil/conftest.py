"""Features of the tiny demo cohort from a small random-init encoder."""

import pytest
import timm
import torch

from pipeline.extract import ExtractConfig
from pipeline.extraction import extract
from pipeline.ssl.export import save_encoder


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory, tiny_prep):
    tiny = {
        "num_classes": 0,
        "img_size": 32,
        "patch_size": 16,
        "depth": 1,
        "embed_dim": 16,
        "num_heads": 2,
    }
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **tiny)
    root = tmp_path_factory.mktemp("bags")
    enc = save_encoder(
        model.state_dict(), "vit_tiny_patch16_224", tiny, root / "enc", input_size=32
    )
    extract(
        ExtractConfig(
            coords=tiny_prep / "coords",
            encoder=str(enc),
            out=root / "feats",
            batch_size=64,
            workers=0,
            precision="fp32",
            dtype="float32",
            progress=False,
        )
    )
    return root / "feats"
