"""The EXAPath preset against the reference (torchstain's Macenko with EXAPath's constants)."""

import json

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.stain import load_normalizer
from pipeline.stain.presets import STAIN_PRESETS, body_sha256, normalizer_body


def test_exapath_matches_torchstain_within_one_level(carcinoma, skin_tiles):
    from torchstain.torch.normalizers import TorchMacenkoNormalizer

    reference = TorchMacenkoNormalizer()  # its reference stains and concentrations are EXAPath's
    params = STAIN_PRESETS["exapath"]["params"]
    np.testing.assert_allclose(reference.HERef.numpy(), params["stains"])
    np.testing.assert_allclose(reference.maxCRef.numpy(), params["max_conc"])
    crops = torch.stack(
        [carcinoma[:, y : y + 224, x : x + 224] for y in (0, 700) for x in (0, 700)]
    )
    tiles = torch.cat([skin_tiles, crops])  # 13 real tiles of two scanners and stains
    normalized = load_normalizer("exapath")(tiles)
    for tile, ours in zip(tiles, normalized, strict=True):
        expected, _, _ = reference.normalize(tile, Io=240, alpha=1, beta=0.15, stains=False)
        diff = (ours.permute(1, 2, 0).int() - expected.int()).abs()  # H x W x 3, 0-255 levels
        assert diff.max() <= 1  # the reference truncates to integers, this rounds
        assert ours.ne(tile).float().mean() > 0.5  # the tile was normalised


def test_exapath_keeps_the_tile_where_the_reference_fails():
    from torchstain.torch.normalizers import TorchMacenkoNormalizer

    glass = torch.full((1, 3, 64, 64), 250, dtype=torch.uint8)  # no pixel above beta
    with pytest.raises(Exception):  # noqa: B017 (the reference fails in torch.linalg)
        TorchMacenkoNormalizer().normalize(glass[0], Io=240, alpha=1, beta=0.15, stains=False)
    normalizer = load_normalizer("exapath")
    assert torch.equal(normalizer(glass), glass)  # as EXAPath: the original tile is kept
    assert normalizer.passthrough == 1


def test_preset_bodies_and_digests(tmp_path):
    body = normalizer_body("exapath")
    assert body == STAIN_PRESETS["exapath"] and body is not STAIN_PRESETS["exapath"]
    spaced = tmp_path / "exapath.json"
    spaced.write_text(json.dumps(body, indent=4))
    assert body_sha256(normalizer_body(spaced)) == body_sha256(body)  # canonical JSON
    assert load_normalizer(spaced).state_dict() == load_normalizer("exapath").state_dict()
    with pytest.raises(PipelineError, match="nor a preset .*exapath"):
        normalizer_body(tmp_path / "missing.json")
