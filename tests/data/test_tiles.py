import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.data.tiles import TileDataset
from pipeline.wsi.coords import read_coords
from pipeline.wsi.preprocess import PreprocessConfig, preprocess
from pipeline.wsi.reader import Slide


@pytest.fixture(scope="module")
def coords_files(tmp_path_factory, tiny_cohort):
    out = tmp_path_factory.mktemp("tiles-prep")
    preprocess(
        PreprocessConfig(slides=str(tiny_cohort / "slides"), out=out, tile_size=64), progress=False
    )
    return sorted((out / "coords").glob("*.h5"))


def test_items_are_the_tiles_read_by_hand(coords_files):
    dataset = TileDataset(coords_files)
    assert len(dataset) == sum(len(read_coords(f)) for f in coords_files)
    rng = np.random.default_rng(0)
    for index in rng.choice(len(dataset), 12, replace=False):
        item = dataset[int(index)]
        table = read_coords(coords_files[item["slide"]])
        x, y = table.coords[item["index"]]
        assert item["coords"].tolist() == [x, y]
        assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.uint8
        with Slide(table.slide_path) as slide:
            size0 = table.patch_size_level0
            by_hand = slide.read_at_mpp((int(x), int(y)), 64, 0.5)
            if abs(size0 / 64 - 1) <= 0.02:
                by_hand = slide.read_region((int(x), int(y)), 0, (64, 64))
        np.testing.assert_array_equal(item["image"].permute(1, 2, 0).numpy(), by_hand)


def test_dataloader_workers_and_slide_cache(coords_files):
    dataset = TileDataset(coords_files, max_open_slides=2)
    loader = DataLoader(
        dataset,
        batch_size=32,
        num_workers=2,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    seen = 0
    for batch in loader:
        assert batch["image"].shape[1:] == (3, 64, 64)
        seen += len(batch["image"])
    assert seen == len(dataset)
    for i in range(0, len(dataset), max(1, len(dataset) // 40)):  # many slides, 2 open at once
        dataset[i]
        assert len(dataset._open) <= 2
    dataset.close()


def test_moved_slides_and_bad_index(coords_files, tiny_cohort, tmp_path):
    table = read_coords(coords_files[0])
    moved = tmp_path / "moved.svs"
    moved.symlink_to(table.slide_path)
    dataset = TileDataset(coords_files[:1], slide_paths={table.attrs["slide_id"]: moved})
    assert dataset.paths[0] == moved and dataset[0]["image"].shape == (3, 64, 64)
    with pytest.raises(IndexError):
        dataset[len(dataset)]
