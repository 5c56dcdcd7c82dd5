"""``cpath pretrain``: DINOv2-style self-supervised pretraining on tiles read from slides.

    cpath pretrain --config configs/pretrain/tiny-cpu.yaml --data.coords runs/prep/coords
    cpath pretrain --config configs/pretrain/vitb16.yaml --trainer.devices 8 --trainer.num_nodes 4
    cpath pretrain ... --ckpt_path last          # resume (also on another number of devices)
    cpath pretrain export CKPT [--out DIR]       # export the teacher backbone of a checkpoint

Outputs under ``out``: ``checkpoints/last.ckpt`` (replaced every ``ckpt_every_n_steps``),
``logs/metrics.csv`` (or TensorBoard events), ``config.yaml`` and, at the end,
``encoder/model.safetensors`` + ``encoder/config.json``. Multi-GPU and multi-node runs
use Lightning's launchers: ``--trainer.devices N`` on one machine, ``srun`` under SLURM
or ``torchrun`` across nodes (``--trainer.num_nodes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from pipeline.errors import ConfigError, PipelineError
from pipeline.ssl.config import (
    DataConfig,
    DistillConfig,
    LossConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    TrainerConfig,
)


@dataclass
class PretrainConfig:
    """Self-supervised pretraining (DINO + iBOT + KoLeo/KDE) of a timm ViT on slide tiles.

    Args:
        action: train, or export (the teacher backbone of --ckpt_path to OUT/encoder).
        out: run folder (checkpoints, logs, config, exported encoder).
        ckpt_path: checkpoint to resume from ("last": the run's latest; none there: start).
        model: backbone and heads.
        data: tiles and multi-crop views.
        loss: objectives and teacher targets.
        optim: optimiser and schedules.
        trainer: devices, strategy, precision, steps, checkpoints.
        monitor: probes during training.
        distill: frozen expert encoders the student also distils from (GPFM).
    """

    positional: ClassVar[tuple[str, ...]] = ("action", "ckpt_path")

    action: Literal["train", "export"] = "train"
    out: Path = Path("models/pretrain")
    ckpt_path: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def checkpoint_path(cfg: PretrainConfig) -> Path | None:
    """The checkpoint named by ``--ckpt_path`` ("last": the run's own, if any)."""
    if cfg.ckpt_path in (None, ""):
        return None
    if cfg.ckpt_path == "last":
        last = Path(cfg.out) / "checkpoints" / "last.ckpt"
        return last if last.is_file() else None
    path = Path(cfg.ckpt_path)
    if not path.is_file():
        raise PipelineError(f"{path}: checkpoint not found (use --ckpt_path last to resume a run)")
    return path


def export_action(cfg: PretrainConfig) -> Path:
    """``cpath pretrain export CKPT``: the teacher backbone to ``out/encoder`` (checked before
    anything heavy is imported, so that a wrong path fails at once)."""
    ckpt = checkpoint_path(cfg)
    if ckpt is None:
        raise ConfigError(
            "`cpath pretrain export` needs a checkpoint: cpath pretrain export CKPT "
            "(or --ckpt_path last --out RUN)"
        )
    from pipeline.ssl.export import export_encoder

    encoder = export_encoder(ckpt, Path(cfg.out) / "encoder")
    print(f"encoder exported to {encoder}")
    return encoder


def run(cfg: PretrainConfig) -> Path:
    if cfg.action == "export":
        return export_action(cfg)
    from pipeline.ssl.train import train

    return train(cfg)
