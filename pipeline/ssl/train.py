"""The pretraining run: Lightning Trainer, checkpoints, logs, resumption and export."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from pipeline.config import save_config
from pipeline.errors import ConfigError
from pipeline.ssl.data import PretrainDataModule, PretrainTiles
from pipeline.ssl.export import export_encoder, stain_norm_record
from pipeline.ssl.module import DINOv2Module, fsdp_units
from pipeline.ssl.monitors import AtomicCheckpointIO, KNNProbe, SlideKNN
from pipeline.ssl.pretrain import PretrainConfig, checkpoint_path

log = logging.getLogger(__name__)


def _check(cfg: PretrainConfig) -> None:
    d, t = cfg.data, cfg.trainer
    if d.batch_size < 1 or t.max_steps < 1:
        raise ConfigError("--data.batch_size and --trainer.max_steps must be at least 1")
    if d.local_size > d.global_size:
        raise ConfigError(
            f"local crops ({d.local_size} px) larger than global crops ({d.global_size} px)"
        )
    if cfg.loss.mask_ratio[0] > cfg.loss.mask_ratio[1] or not 0 <= cfg.loss.mask_probability <= 1:
        raise ConfigError("--loss.mask_ratio must be (low, high) and mask_probability in [0, 1]")
    if t.logger == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--trainer.logger tensorboard needs `pip install tensorboard`; "
                "the default csv logger needs nothing"
            ) from None
    if t.strategy.startswith("fsdp") and t.accelerator == "cpu":
        raise ConfigError("FSDP needs GPUs; use --trainer.strategy ddp on CPU")


def make_strategy(name: str):
    """Lightning strategy by name; ``fsdp`` shards the units of :func:`fsdp_units`
    (full-state checkpoints, so they load on any number of devices)."""
    if name != "fsdp":
        return name
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy(auto_wrap_policy=fsdp_units(), state_dict_type="full", use_orig_params=True)


def train(cfg: PretrainConfig) -> Path:
    """Train (or resume) and export the encoder; returns the encoder folder."""
    _check(cfg)
    out = Path(cfg.out)
    L.seed_everything(cfg.data.seed, workers=True, verbose=False)
    resume = checkpoint_path(cfg)
    module = DINOv2Module.from_configs(
        cfg.model,
        cfg.loss,
        cfg.optim,
        cfg.trainer.max_steps,
        cfg.monitor.rankme_every_n_steps,
        cfg.data,
        load_init=resume is None,  # a resumed run's checkpoint holds its weights
        distill=cfg.distill,
    )
    patch = module.student.backbone.patch_size
    if cfg.data.global_size % patch:
        raise ConfigError(
            f"--data.global_size {cfg.data.global_size} is not a multiple of the "
            f"patch size {patch} of {cfg.model.arch}"
        )
    datamodule = PretrainDataModule(cfg.data, cfg.loss, patch, cfg.trainer.max_steps)
    datamodule.dataset = PretrainTiles(cfg.data)  # fail early: no tiles, crops too large
    # the normalizer the exported encoder records (read now: the file may move by the end)
    stain = stain_norm_record(cfg.data.stain_norm) if cfg.data.stain_norm else None
    t = cfg.trainer
    callbacks = [
        ModelCheckpoint(
            dirpath=out / "checkpoints",
            every_n_train_steps=t.ckpt_every_n_steps,
            save_last=True,
            save_top_k=-1 if t.keep_checkpoints else 0,
            filename="step-{step:07d}",
            auto_insert_metric_name=False,
        ),
    ]
    if t.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    if cfg.monitor.probe:
        callbacks.append(
            KNNProbe(
                cfg.monitor.probe,
                cfg.monitor.probe_every_n_steps,
                cfg.data.global_size,
                cfg.data.mean,
                cfg.data.std,
            )
        )
    if cfg.monitor.slide_knn_every_n_steps > 0:
        callbacks.append(
            SlideKNN(
                cfg.monitor.slide_knn_every_n_steps,
                cfg.monitor.slide_knn_slides,
                cfg.monitor.slide_knn_tiles,
                cfg.data.global_size,
                cfg.data.mean,
                cfg.data.std,
                max_background=cfg.data.max_background,
                seed=cfg.data.seed,
            )
        )
    logger = (
        TensorBoardLogger(out, name="logs", version="")
        if t.logger == "tensorboard"
        else CSVLogger(out, name="logs", version="", flush_logs_every_n_steps=t.log_every_n_steps)
    )
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=make_strategy(t.strategy),
        precision=t.precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=t.log_every_n_steps,
        use_distributed_sampler=False,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=out,
        num_sanity_val_steps=0,
    )
    if trainer.is_global_zero:
        keep_earlier_metrics(out)
        save_config(cfg, out)
        log.info(
            "pretraining %s on %d tiles of %d slides -> %s%s",
            cfg.model.arch,
            len(datamodule.dataset),
            datamodule.dataset.slides,
            out,
            f" (resuming {resume})" if resume else "",
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before.*")
        warnings.filterwarnings("ignore", ".*mid-epoch.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    last = out / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last)  # the final state, whatever the checkpoint interval
    encoder = out / "encoder"
    if trainer.is_global_zero:
        extra = {"tiles": _tile_facts(datamodule.dataset)}
        if stain is not None:
            extra["stain_norm"] = stain
        export_encoder(last, encoder, extra=extra)
        log.info("encoder exported to %s (step %d)", encoder, trainer.global_step)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()  # else gloo/NCCL can abort the process at exit
    return encoder


def fit_in_process(
    module: DINOv2Module,
    datamodule: PretrainDataModule,
    steps: int,
    out: str | Path,
    callbacks: tuple = (),
) -> L.Trainer:
    """Train ``module`` for ``steps`` steps in this process on the CPU, in 32-bit, without
    logger, progress bar or checkpoints (planted tasks and tests; :func:`train` is the run
    with all of those). Returns the trainer."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=steps,
        max_epochs=-1,
        logger=False,
        callbacks=list(callbacks),
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer


def keep_earlier_metrics(out: Path) -> None:
    """Keep the metrics of an earlier (interrupted) run: the CSV logger starts a new file."""
    current = out / "logs" / "metrics.csv"
    if current.is_file():
        n = len(list(current.parent.glob("metrics.*.csv")))
        current.rename(current.with_name(f"metrics.{n:03d}.csv"))


def read_metrics(out: str | Path) -> list[dict]:
    """All logged rows of a run over its restarts, one dict per step, sorted by step. Steps
    logged again after a resume (those after the checkpoint it resumed from) take the
    resumed run's values."""
    import csv

    logs = Path(out) / "logs"
    rows: dict[int, dict] = {}
    for path in [*sorted(logs.glob("metrics.*.csv")), logs / "metrics.csv"]:
        if not path.is_file():
            continue
        this_run: dict[int, dict] = {}
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                values = {k: float(v) for k, v in row.items() if v not in ("", None)}
                if "step" in values:
                    this_run.setdefault(int(values["step"]), {}).update(values)
        rows.update(this_run)
    return [rows[k] for k in sorted(rows)]


def _tile_facts(dataset: PretrainTiles) -> dict:
    tables = dataset.tiles.tables
    return {
        "target_mpp": tables[0].target_mpp,
        "patch_size": tables[0].patch_size,
        "slides": len(tables),
        "tiles": len(dataset),
    }
