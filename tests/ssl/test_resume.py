"""A stopped and resumed pretraining run trains on exactly the tiles of an uninterrupted one."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset

from pipeline.ssl.config import DataConfig, LossConfig
from pipeline.ssl.data import PretrainDataModule, StreamSampler
from pipeline.ssl.stream import TileStream

SCALE = 64.0  # tile i is an image filled with i / SCALE
N, BATCH, STEPS = 7, 2, 10
SLIDES, PER_VISIT = [3, 4], 2  # the N tiles as two slides, read two at a time


class IndexTiles(Dataset):
    """``N`` fake tiles whose views are filled with their index (no slides needed)."""

    slide_sizes = SLIDES

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        value = i / SCALE
        return [torch.full((3, 16, 16), value)] * 2, [torch.full((3, 8, 8), value)]


class Record(L.Callback):
    """The tile indices of the batch of each global step (read from the batch itself)."""

    def __init__(self, stop_at: int | None = None):
        self.batches: dict[int, list[int]] = {}
        self.stop_at = stop_at

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.stop_at:
            raise Stopped  # like a killed job: the last checkpoint is some steps back
        b = batch["global"].shape[0] // 2  # 2B x 3 x G x G, view-major
        self.batches[trainer.global_step] = (
            (batch["global"][:b, 0, 0, 0] * SCALE).round().int().tolist()
        )


class Stopped(Exception):
    pass


def fit(make_module, out, record: Record, ckpt_path=None, steps: int = STEPS) -> L.LightningModule:
    """Train as ``pipeline.ssl.train`` does: one process, a last.ckpt every 3 steps and at
    the end."""
    data = DataConfig(
        batch_size=BATCH,
        workers=0,
        global_size=16,
        local_size=8,
        local_crops=1,
        seed=3,
        tiles_per_visit=PER_VISIT,
    )
    datamodule = PretrainDataModule(data, LossConfig(), patch_size=8, max_steps=steps)
    datamodule.dataset = IndexTiles()
    module = make_module(steps)
    checkpoints = ModelCheckpoint(dirpath=out, every_n_train_steps=3, save_last=True, save_top_k=0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        callbacks=[checkpoints, record],
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    trainer.save_checkpoint(out / "last.ckpt")
    return module


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("stop_at", [5, 8])  # last.ckpt of steps 3 and 6 of 10
def test_resumed_run_sees_the_tiles_of_an_uninterrupted_run(tiny_module, tmp_path, stop_at):
    whole = Record()
    fit(tiny_module, tmp_path / "whole", whole)
    stream = list(StreamSampler(TileStream(SLIDES, PER_VISIT, 3), BATCH, STEPS))
    assert whole.batches == {k: stream[k * BATCH : (k + 1) * BATCH] for k in range(STEPS)}

    with pytest.raises(Stopped):  # killed during a step: the checkpoint is a few steps back
        fit(tiny_module, tmp_path / "run", Record(stop_at=stop_at))
    last = tmp_path / "run" / "last.ckpt"
    step = torch.load(last, weights_only=False)["global_step"]
    assert step == stop_at // 3 * 3
    resumed = Record()
    module = fit(tiny_module, tmp_path / "run", resumed, ckpt_path=last)
    assert resumed.batches == {k: whole.batches[k] for k in range(step, STEPS)}  # no repeat, no gap
    assert module.samples_seen == STEPS * BATCH


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_finished_run_extended_to_more_steps_reads_on(tiny_module, tmp_path):
    fit(tiny_module, tmp_path, Record())
    extended = Record()
    module = fit(tiny_module, tmp_path, extended, ckpt_path=tmp_path / "last.ckpt", steps=STEPS + 3)
    stream = list(StreamSampler(TileStream(SLIDES, PER_VISIT, 3), BATCH, STEPS + 3))
    assert extended.batches == {k: stream[k * BATCH : (k + 1) * BATCH] for k in range(10, 13)}
    assert module.samples_seen == (STEPS + 3) * BATCH
