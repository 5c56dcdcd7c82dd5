"""Features of the tiny demo cohort from a small random-init encoder."""

import pytest

from pipeline.extract import ExtractConfig
from pipeline.extraction import extract
from tests.tiny_encoder import save_tiny_encoder


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory, tiny_prep):
    root = tmp_path_factory.mktemp("bags")
    enc = save_tiny_encoder(root / "enc", img_size=32, depth=1, embed_dim=16)
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
