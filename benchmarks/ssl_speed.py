"""Pretraining speed: a full DINOv2 step against a bare forward + backward of the student.

On the same batch of multi-crop views made from demo tiles (``make demo`` builds them),
one run measures (median of ``--steps`` timed steps after warm-up):

- full SSL step: the crops' colour augmentations on the device, teacher forward, student
  forward/backward on all crops, DINO/iBOT/KoLeo losses, AdamW step, teacher EMA;
- bare step: student backbone forward + backward of the same crops (sum of class tokens),
  the least any trainer of this model must do;
- data: multi-crop batches per second from the DataLoader with the preset's workers,
  to show whether data loading can keep up.

Usage: ``python benchmarks/ssl_speed.py [--config configs/pretrain/tiny-cpu.yaml] [--device cuda]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.ssl.data import PretrainDataModule
from pipeline.ssl.module import DINOv2Module
from pipeline.ssl.pretrain import PretrainConfig

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, steps: int, device: str) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/pretrain/tiny-cpu.yaml"))
    parser.add_argument("--coords", default=str(ROOT / "runs/demo/preprocess/coords"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    overrides = {"data.coords": args.coords}
    if args.batch_size:
        overrides["data.batch_size"] = args.batch_size
    cfg = load_config(PretrainConfig, args.config, **overrides)
    module = DINOv2Module.from_configs(cfg.model, cfg.loss, cfg.optim, cfg.trainer.max_steps)
    module.to(args.device)
    dm = PretrainDataModule(cfg.data, cfg.loss, module.student.backbone.patch_size, 10**9)
    dm.setup()
    b = cfg.data.batch_size
    raw = dm.collate([dm.dataset[i] for i in range(b)])  # uint8 crops, as workers ship them
    raw = {k: v.to(args.device) for k, v in raw.items()}
    batch = dm.augment.batch(raw)  # float crops, for the bare step
    optimizer = module.configure_optimizers()
    autocast = torch.autocast(
        args.device.split(":")[0], dtype=torch.bfloat16, enabled="bf16" in cfg.trainer.precision
    )

    def full_step() -> None:  # with the on-device colour augmentations of the crops
        with autocast:
            terms, _, _ = module.ssl_losses(dm.augment.batch(raw), 0.04)
            loss = sum(terms.values())
        loss.backward()
        module.clip_gradients_per_part()  # as the trainer does: backbone and heads each
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.update_teacher(0.996)

    backbone = module.student.backbone

    def bare_step() -> None:
        with autocast:
            out = backbone(batch["global"])[0].float().sum()
            if batch["local"].numel():
                out = out + backbone(batch["local"])[0].float().sum()
        out.backward()
        backbone.zero_grad(set_to_none=True)

    full = timed(full_step, args.steps, args.device)
    bare = timed(bare_step, args.steps, args.device)
    views = 2 + cfg.data.local_crops
    print(
        f"{cfg.model.arch} {cfg.model.arch_kwargs or ''} on {args.device} "
        f"({torch.get_num_threads()} threads), batch {b}, {cfg.data.global_size}/"
        f"{cfg.data.local_size} px crops x {views}, {cfg.trainer.precision}"
    )
    print(f"  full SSL step   {full * 1e3:8.1f} ms  {b / full:7.1f} images/s")
    print(f"  bare fwd+bwd    {bare * 1e3:8.1f} ms  {b / bare:7.1f} images/s")
    print(f"  overhead ratio  {full / bare:8.2f}x (full / bare)")
    loader = dm.train_dataloader_for(steps=args.steps + 2)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(args.steps):
        next(it)
    per_batch = (time.perf_counter() - start) / args.steps
    print(
        f"  data ({cfg.data.workers} workers) {per_batch * 1e3:6.1f} ms per batch "
        f"({b / per_batch:7.1f} images/s): {per_batch / full:.2f} of a full step"
    )


if __name__ == "__main__":
    main()
