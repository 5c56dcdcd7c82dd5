import numpy as np
import pytest
import torch
from skimage.color import rgb2hed, rgb2lab

from pipeline.errors import PipelineError
from pipeline.stain import STAIN_METHODS, MacenkoNormalizer, ReinhardNormalizer, load_normalizer
from pipeline.stain.base import masked_quantile
from pipeline.stain.color import hed_to_rgb, lab_to_rgb, rgb_to_hed, rgb_to_lab

METHODS = sorted(STAIN_METHODS)


def _mad(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Mean absolute difference per channel of two H x W x 3 images, in 0-255 units."""
    return (a.int() - b.int()).abs().float().mean(dim=(0, 1)).numpy()


def test_macenko_matches_torchstain_on_real_tiles(carcinoma, skin_tiles):
    from torchstain.torch.normalizers import TorchMacenkoNormalizer

    target = carcinoma[:, :512, :512]
    ours = MacenkoNormalizer().fit(target)
    reference = TorchMacenkoNormalizer()
    reference.fit(target)
    np.testing.assert_allclose(ours.stains.numpy(), reference.HERef.numpy(), atol=0.01)
    np.testing.assert_allclose(ours.max_conc.numpy(), reference.maxCRef.numpy(), rtol=0.02)
    out = ours(skin_tiles)  # 9 x 3 x 224 x 224, one batch
    for tile, normalized in zip(skin_tiles, out, strict=True):
        expected, _, _ = reference.normalize(tile, stains=False)
        assert _mad(normalized.permute(1, 2, 0), expected).max() <= 2.0


def test_reinhard_matches_torchstain_on_real_tiles(carcinoma, skin_tiles):
    from torchstain.torch.normalizers import TorchReinhardNormalizer

    target = carcinoma[:, :512, :512]
    ours = ReinhardNormalizer().fit(target)
    reference = TorchReinhardNormalizer()
    reference.fit(target)
    out = ours(skin_tiles)
    for tile, normalized in zip(skin_tiles, out, strict=True):
        assert _mad(normalized.permute(1, 2, 0), reference.normalize(tile)).max() <= 2.0


@pytest.mark.parametrize("method", METHODS)
def test_own_stain_returns_nearly_the_same_tile(method, carcinoma):
    tile = carcinoma[:, 300:556, 300:556]
    normalizer = STAIN_METHODS[method]().fit(tile)
    assert _mad(normalizer(tile).permute(1, 2, 0), tile.permute(1, 2, 0)).max() <= 4.0


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_per_tile(method, carcinoma, skin_tiles):
    normalizer = STAIN_METHODS[method]().fit(carcinoma)
    batched = normalizer(skin_tiles)
    one_by_one = torch.stack([normalizer(t) for t in skin_tiles])
    assert (batched.int() - one_by_one.int()).abs().max() <= 1
    assert batched.shape == skin_tiles.shape and batched.dtype == torch.uint8
    floats = normalizer(skin_tiles.float() / 255)  # float in [0, 1] in, float out
    assert floats.dtype == torch.float32 and (floats * 255 - batched.float()).abs().max() <= 1.01


@pytest.mark.parametrize("method", METHODS)
def test_same_result_inside_bf16_autocast(method, carcinoma, skin_tiles):
    """Extraction runs the normalizer inside the encoder's autocast: it must stay in fp32."""
    normalizer = STAIN_METHODS[method]().fit(carcinoma)
    plain = normalizer(skin_tiles)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = normalizer(skin_tiles)
    assert torch.equal(plain, mixed)


@pytest.mark.parametrize("method", METHODS)
def test_blank_tiles_pass_through_and_are_counted(method, carcinoma, skin_tiles):
    normalizer = STAIN_METHODS[method]().fit(carcinoma)
    white = torch.full((3, 3, 224, 224), 255, dtype=torch.uint8)
    glass = torch.full((1, 3, 224, 224), 238, dtype=torch.uint8)
    batch = torch.cat([skin_tiles[:2], white, glass])
    out = normalizer(batch)
    assert torch.equal(out[2:], batch[2:])
    assert normalizer.passthrough == 4 and normalizer.seen == 6
    assert not torch.equal(out[:2], batch[:2])
    floats = batch.double() / 255 + 1e-4  # between 8-bit levels, in the caller's float64
    out = normalizer(floats)
    assert out.dtype == torch.float64 and torch.equal(out[2:], floats[2:])  # bit for bit


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
def test_pen_ink_tiles_pass_through(method, carcinoma):
    """Blue, green and black marker on glass: not H&E, so left as they are."""
    generator = torch.Generator().manual_seed(0)
    tiles = []
    for ink in [(40, 60, 160), (30, 120, 70), (35, 35, 40)]:
        tile = torch.full((3, 224, 224), 240.0)
        tile[:, 40:200, 40:200] = torch.tensor(ink, dtype=torch.float32)[:, None, None]
        tiles.append((tile + 4 * torch.randn(tile.shape, generator=generator)).clamp(0, 255))
    batch = torch.stack(tiles).to(torch.uint8)
    normalizer = STAIN_METHODS[method]().fit(carcinoma)
    assert torch.equal(normalizer(batch), batch) and normalizer.passthrough == 3


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_give_the_same_output(method, tmp_path, carcinoma, skin_tiles):
    normalizer = STAIN_METHODS[method]().fit([carcinoma[:, :500], carcinoma[:, 500:]])
    path = normalizer.save(tmp_path / "stain.json")
    loaded = load_normalizer(path)
    assert type(loaded) is type(normalizer)
    assert torch.equal(loaded(skin_tiles), normalizer(skin_tiles))


def test_bad_inputs_give_clear_errors(carcinoma, tmp_path):
    normalizer = MacenkoNormalizer().fit(carcinoma)
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        normalizer(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8 or float"):
        normalizer(torch.zeros(2, 3, 8, 8, dtype=torch.int32))
    nan = torch.rand(1, 3, 8, 8)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        normalizer(nan)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        normalizer(torch.rand(1, 3, 8, 8) * 255)
    with pytest.raises(TypeError, match="torch.Tensor"):
        normalizer(np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(PipelineError, match="not fitted"):
        ReinhardNormalizer()(carcinoma)
    with pytest.raises(ValueError, match="too little tissue"):
        MacenkoNormalizer().fit(torch.full((3, 64, 64), 250, dtype=torch.uint8))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PipelineError, match="not a stain normalizer file"):
        load_normalizer(tmp_path / "bad.json")
    assert normalizer(torch.zeros(0, 3, 8, 8, dtype=torch.uint8)).shape[0] == 0


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_runs_on_the_device_of_the_batch(device, carcinoma, skin_tiles):
    normalizer = MacenkoNormalizer().fit(carcinoma).to(device)
    out = normalizer(skin_tiles.to(device))
    assert out.device.type == device
    cpu = MacenkoNormalizer().fit(carcinoma)(skin_tiles)
    assert (out.cpu().int() - cpu.int()).abs().float().mean() < 0.5


def test_colour_conversions_match_scikit_image(carcinoma):
    rgb = carcinoma[:, :128, :128].permute(1, 2, 0).numpy()
    x = carcinoma[None, :, :128, :128].float() / 255
    np.testing.assert_allclose(rgb_to_lab(x)[0].permute(1, 2, 0).numpy(), rgb2lab(rgb), atol=1e-3)
    np.testing.assert_allclose(rgb_to_hed(x)[0].permute(1, 2, 0).numpy(), rgb2hed(rgb), atol=1e-5)
    assert (lab_to_rgb(rgb_to_lab(x)) - x).abs().max() < 1e-4
    hed = rgb_to_hed(x)
    assert (rgb_to_hed(hed_to_rgb(hed)) - hed).abs().max() < 1e-3


def test_masked_quantile_matches_nearest_rank():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 5000)).astype(np.float32)
    mask = rng.uniform(size=(4, 5000)) > 0.3
    mask[3] = False
    got = masked_quantile(torch.from_numpy(values), torch.from_numpy(mask), 0.01).numpy()
    for row in range(3):
        expected = np.percentile(values[row][mask[row]], 1, method="nearest")
        span = np.ptp(values[row][mask[row]])
        assert abs(got[row] - expected) <= span / 4096 * 1.5
    assert np.isnan(got[3])
