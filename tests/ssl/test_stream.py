"""The slide-chunked tile stream and the on-device crop augmentations."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from pipeline.ssl.augment import DeviceAugment, gaussian_blur
from pipeline.ssl.config import DataConfig, LossConfig
from pipeline.ssl.data import PretrainDataModule, PretrainTiles, StreamSampler
from pipeline.ssl.stream import Permutation, TileStream


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_keyed_permutation_is_a_permutation_and_depends_on_its_key(n):
    values = Permutation(n, (0, 1))(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))
    if n >= 64:
        other = Permutation(n, (0, 2))(np.arange(n))
        assert (values != other).mean() > 0.9 and (values != np.arange(n)).mean() > 0.9


def test_every_visit_reads_k_tiles_of_one_slide_and_a_pass_covers_all():
    sizes, k = [5, 1, 9, 4], 3  # chunks: 2 + 1 + 3 + 2 = 8 -> 24 positions per pass
    stream = TileStream(sizes, per_visit=k, seed=7)
    assert stream.pass_length == 24
    tiles = stream(np.arange(2 * 24))
    slide_of = np.repeat(np.arange(4), sizes)
    for visit in tiles.reshape(-1, k):
        assert len(set(slide_of[visit])) == 1  # one slide per visit
    first, second = tiles[:24], tiles[24:]
    assert set(first) == set(range(19)) == set(second)  # every tile at least once per pass
    assert list(first) != list(second)  # each pass has its own order
    # a slide's tiles appear once per pass, plus its wrapped last chunk's repeats
    counts = np.bincount(first, minlength=19)
    assert counts[5] == 3 and counts[:5].sum() == 6 and counts[6:15].sum() == 9


def test_one_tile_per_visit_gives_a_permutation_of_all_tiles_per_pass():
    stream = TileStream([4, 7, 2], per_visit=1, seed=1)
    tiles = stream(np.arange(13))
    assert sorted(tiles.tolist()) == list(range(13))
    slide_of = np.repeat(np.arange(3), [4, 7, 2])
    assert len({tuple(slide_of[tiles[i : i + 3]]) for i in range(0, 12, 3)}) > 1  # mixed


def test_stream_positions_are_pure_functions_of_seed_and_position():
    stream = TileStream([50, 70, 30], per_visit=4, seed=3)
    whole = stream(np.arange(1000))
    again = TileStream([50, 70, 30], per_visit=4, seed=3)
    assert np.array_equal(again(np.arange(600, 1000)), whole[600:])  # resumed in pass 2+
    assert np.array_equal(again(np.array([999, 0, 517])), whole[[999, 0, 517]])
    assert not np.array_equal(TileStream([50, 70, 30], 4, seed=4)(np.arange(1000)), whole)


def test_sampler_over_a_chunked_stream_resumes_on_other_rank_counts():
    stream = TileStream([9, 14, 6], per_visit=3, seed=5)
    batch = 6
    one = list(StreamSampler(stream, batch, steps=20))
    assert one == stream(np.arange(120)).tolist()
    three = [list(StreamSampler(stream, 2, 20, rank=r, world=3)) for r in range(3)]
    for step in range(20):
        merged = sum((three[r][2 * step : 2 * step + 2] for r in range(3)), [])
        assert merged == one[batch * step : batch * (step + 1)]
    resumed = [list(StreamSampler(stream, 3, 13, rank=r, world=2, start=42)) for r in range(2)]
    assert resumed[0][:3] + resumed[1][:3] == one[42:48]


def test_blur_equals_torchvision_per_image_sigma():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 20, 24)
    sigma = torch.tensor([0.1, 0.7, 2.0])
    out = gaussian_blur(images, sigma)
    for i in range(3):
        s = float(sigma[i])
        expected = TF.gaussian_blur(images[i], kernel_size=[9, 9], sigma=[s, s])
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


def test_device_augment_normalises_and_solarizes_only_second_global_crops():
    cfg = DataConfig(stain_augment=False, blur=0.0, solarize=1.0, mean=(0.5,) * 3, std=(0.25,) * 3)
    crops = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)  # B = 2: views 0, 0, 1, 1
    out = DeviceAugment(cfg)(crops, solarize_from=2)
    x = crops.float() / 255
    torch.testing.assert_close(out[:2], (x[:2] - 0.5) / 0.25)
    solar = torch.where(x[2:] >= 128 / 255, 1 - x[2:], x[2:])
    torch.testing.assert_close(out[2:], (solar - 0.5) / 0.25)


def test_device_augment_draws_per_crop_stain_and_blur():
    torch.manual_seed(1)
    cfg = DataConfig(blur=0.5, solarize=0.0)
    tile = torch.randint(60, 200, (1, 3, 16, 16), dtype=torch.uint8).expand(64, 3, 16, 16)
    batch = {"global": tile, "local": tile[:8, :, :8, :8], "masks": torch.zeros(64, 4)}
    out = DeviceAugment(cfg).batch(batch)
    assert out["global"].dtype == torch.float32 and out["local"].shape == (8, 3, 8, 8)
    distinct = {tuple(row.round(decimals=4).flatten()[:12].tolist()) for row in out["global"]}
    assert len(distinct) == 64  # same tile, own jitter per crop
    assert DeviceAugment(cfg).batch(out) is out  # float crops pass untouched


def loader_batch(cfg: DataConfig) -> tuple[dict, PretrainDataModule]:
    data = PretrainDataModule(cfg, LossConfig(), patch_size=16, max_steps=2)
    data.dataset = PretrainTiles(cfg)
    raw = next(iter(data.train_dataloader_for(2)))
    return raw, data


def test_random_positions_at_two_mpps_with_the_hsv_filter_feed_batches(tiny_prep):
    """Online patching from one preprocess run: uint8 crops from the workers, float crops
    after the device step, the replaced tiles counted."""
    cfg = DataConfig(
        coords=tiny_prep / "coords",
        batch_size=4,
        workers=0,
        global_size=64,
        local_size=32,
        local_crops=2,
        positions="random",
        mpps=[0.5, 1.0],
        tile_px=128,
        hsv_filter=True,
    )
    raw, data = loader_batch(cfg)
    assert raw["global"].dtype == torch.uint8 and raw["global"].shape == (8, 3, 64, 64)
    assert raw["local"].shape == (8, 3, 32, 32) and int(raw["rejected"]) >= 0
    tiles = data.dataset
    draws = [tiles.patches.draw(i) for i in range(40)]
    assert {d.mpp for d in draws} == {0.5, 1.0}
    assert all(d.tissue_share >= 0.4 for d in draws if not d.fallback)
    out = data.on_after_batch_transfer(raw, 0)
    assert out["global"].dtype == torch.float32 and torch.isfinite(out["global"]).all()
    kept = [tiles.keep(tiles.read(i)) for i in range(8)]
    assert sum(kept) >= 4  # tissue draws mostly pass Virchow's HSV range


def test_the_hsv_filter_replaces_a_tile_it_rejects(tiny_prep):
    cfg = DataConfig(
        coords=tiny_prep / "coords", workers=0, global_size=64, local_size=32, local_crops=1
    )
    *_, replaced = PretrainTiles(replace(cfg, max_background=-1.0))[0]
    assert replaced == 15  # every tile counts as glass: all 16 tries fail, the last is used
    plain = PretrainTiles(cfg)
    strict = PretrainTiles(replace(cfg, hsv_filter=True, hsv_min_share=1.0))
    counts = [strict[i][2] for i in range(6)]
    assert [plain[i][2] for i in range(6)] == [0] * 6 and sum(counts) > 0
    for i, count in enumerate(counts):  # the tile used is the first candidate kept
        if count < 15:
            assert strict.keep(strict.read(i, count))
            assert not any(strict.keep(strict.read(i, a)) for a in range(count))


def test_hed_jitter_reaches_its_share_of_crops_only():
    torch.manual_seed(2)
    cfg = DataConfig(hed_probability=0.5, hsv_hue=0.0, hsv_saturation=0.0, hsv_value=0.0, blur=0.0)
    crops = torch.randint(60, 200, (1, 3, 8, 8), dtype=torch.uint8).expand(400, 3, 8, 8)
    out = DeviceAugment(cfg)(crops)
    plain = DeviceAugment(replace(cfg, stain_augment=False))(crops)
    changed = (out - plain).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert 0.4 < changed.float().mean() < 0.6


class Indexed(torch.utils.data.Dataset):
    """Tiles whose uint8 views carry their own index (as index // 256, index % 256)."""

    slide_sizes = [9, 14, 6]

    def __len__(self) -> int:
        return 29

    def __getitem__(self, i: int):
        view = torch.zeros(3, 16, 16, dtype=torch.uint8)
        view[0, 0, 0] = i
        return [view, view], [view[:, :8, :8]], 0


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_processes_do_not_change_the_stream(workers):
    cfg = DataConfig(
        batch_size=3, workers=workers, global_size=16, local_size=8, local_crops=1, seed=4
    )
    data = PretrainDataModule(cfg, LossConfig(), patch_size=8, max_steps=8)
    data.dataset = Indexed()
    seen = [b["global"][:3, 0, 0, 0].tolist() for b in data.train_dataloader_for(8)]
    expected = TileStream(Indexed.slide_sizes, cfg.tiles_per_visit, 4)(np.arange(24))
    assert sum(seen, []) == expected.tolist()
