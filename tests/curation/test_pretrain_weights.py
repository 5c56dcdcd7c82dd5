"""``cpath pretrain --data.weights``: the tiles of the stream follow the curated weights."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.curation.curate import CurateConfig, run
from pipeline.curation.store import read_weights
from pipeline.errors import ConfigError, PipelineError
from pipeline.ssl.config import DataConfig, LossConfig
from pipeline.ssl.data import PretrainDataModule, PretrainTiles


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, planted_features):
    features, _ = planted_features
    out = tmp_path_factory.mktemp("curated")
    cfg = CurateConfig(features=features, clusters=[3], n_init=3, examples=0, progress=False)
    assert run(replace(cfg, out=out)) == 0
    return out / "weights.h5"


def data_config(tiny_prep, weights_file, **kw) -> DataConfig:
    return DataConfig(
        coords=tiny_prep / "coords",
        weights=weights_file,
        batch_size=16,
        workers=0,
        global_size=64,
        local_size=32,
        local_crops=1,
        **kw,
    )


def test_the_loader_draws_each_planted_concept_a_third_of_the_time(
    tiny_prep, weights_file, planted_features
):
    _, concepts = planted_features
    cfg = data_config(tiny_prep, weights_file)
    data = PretrainDataModule(cfg, LossConfig(), patch_size=16, max_steps=300)
    data.dataset = tiles = PretrainTiles(cfg)
    assert tiles.item_weights is not None and len(tiles.item_weights) == len(tiles)
    loader = data.train_dataloader_for(300)  # 4,800 tiles
    items = np.fromiter(iter(loader.sampler), np.int64)
    # the planted concept of each item: items are the coords files' rows, slide by slide
    truth = np.concatenate([concepts[t.attrs["slide_id"]] for t in tiles.tiles.tables])
    concept = truth[tiles.items[items]]
    share = np.bincount(concept, minlength=3) / len(concept)
    assert np.abs(share - 1 / 3).max() < 0.04, share
    before = np.bincount(truth, minlength=3) / len(truth)
    assert before[0] > 0.7  # unweighted: the common concept dominates
    views, _, _ = tiles[int(items[0])]  # a drawn tile reads as usual
    assert views[0].shape == (3, 64, 64)


def test_weights_errors_are_clear(tiny_prep, weights_file, tmp_path):
    with pytest.raises(ConfigError, match="positions random"):
        PretrainTiles(data_config(tiny_prep, weights_file, positions="random", mpps=[0.5]))
    slides, _ = read_weights(weights_file)
    first = sorted(slides)[0]
    import h5py

    partial = tmp_path / "partial.h5"
    partial.write_bytes(weights_file.read_bytes())
    with h5py.File(partial, "a") as f:
        del f["slides"][first]
    with pytest.raises(PipelineError, match=f"no sampling weights for 1 of .*{first}"):
        PretrainTiles(data_config(tiny_prep, partial))
    with pytest.raises(PipelineError, match="cannot read the sampling weights"):
        PretrainTiles(data_config(tiny_prep, tmp_path / "missing.h5"))
