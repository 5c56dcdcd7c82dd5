"""GPU check: pretraining speed and MFU, data share, extraction, stain share, DDP equality.

The one command to run first on a machine with a CUDA GPU, sized for under 8 minutes on
one H200: every part has a fixed number of steps and a time cap, and no part starts after
``--budget-s`` seconds (400; a part that would not fit says so in its row). Progress lines
come as it goes; it ends with one markdown table (also written to ``--out``):

- ``SSL step ViT-S/16``, ``ViT-B/16``, ``ViT-L/14``: one full DINOv2 training step of the
  presets ``configs/pretrain/vits16.yaml``, ``vitb16.yaml`` and ``vitl14.yaml``, as in
  ``benchmarks/ssl_speed.py``: teacher forward, student forward and backward on all crops,
  DINO/iBOT/KoLeo losses (``DINOv2Module.ssl_losses``), per-part gradient clipping, AdamW
  step and teacher EMA (``update_teacher``), in the preset's precision (bf16 autocast), on synthetic crops
  already on the GPU at the preset's per-GPU batch size and crop sizes (halved until it
  fits if the GPU runs out of memory; the batch used is shown). The schedules and logging
  are not part of the step. Columns: images/s and ms per step
  (median of the timed steps after warm-up), model FLOP utilisation (MFU: the FLOPs of one
  full step counted once by ``torch.utils.flop_counter.FlopCounterMode`` - matmuls,
  convolutions and attention of every forward and backward, teacher included - divided by
  the step time and by the GPU's peak dense bf16 FLOP/s) and the peak GPU memory
  allocated during the preset.
- ``SSL data share ViT-B/16``: the same ViT-B/16 step fed by the real DataLoader
  (``PretrainDataModule.train_dataloader_for`` over the tiles of ``--coords``, with
  ``min(preset workers, CPUs)`` workers, pinned memory and non-blocking copies) against
  the same step on synthetic crops already on the GPU; both are timed over the same
  number of steps after a warm-up long enough to drain the batches the workers prepared
  at start-up. The share is ``1 - synthetic time / real time`` (0 when data loading keeps
  up).
- ``extraction ViT-B/16``, ``ViT-L/14``: tiles/s of ``pipeline.extraction.extract`` on the
  tiles of ``--coords`` (DataLoader workers reading slides, transfer, forward, h5 writing;
  timed from the first batch to the last file, as ``benchmarks/extract_speed.py`` does)
  against a model-only forward (``Encoder.embed`` of random uint8 tiles of the same size
  already on the GPU: normalisation and forward, bf16 autocast, ``torch.inference_mode``)
  at the same batch size; the ratio is pipeline / model-only. ViT-L/14 is
  ``vit_large_patch14_dinov2`` at 224 px, given as a random-init encoder folder because
  ``timm:`` would resize tiles to the model's default 518 px.
- ``stain share (Macenko)``: ms per batch of a Macenko normalizer on the GPU (fitted to
  real tiles of ``--coords``, else to synthetic H&E-like tiles) and of the ViT-B/16
  forward of the same batch; the share is normalisation / (normalisation + forward).
- ``DDP 1 vs 2 GPUs`` (two or more GPUs): one step of the tiny preset
  (``configs/pretrain/tiny-cpu.yaml``, KoLeo off as it is per-process by design, fp32,
  TF32 off) in one process on the whole batch and in two NCCL processes (DDP) on its
  halves; the largest differences of the gradients and of the parameters after the step.

The machine line printed first names the GPUs, their memory, the torch, CUDA and cuDNN
versions, the CPU count and the peak used for MFU: dense bf16 by device name (989 TFLOP/s
for H100 and H200 SXM; ``--peak-tflops`` overrides it; unknown GPUs get no MFU). Without
the ``--coords`` folder (default ``runs/demo/preprocess/coords``, made by ``cpath demo
--stop-after preprocess``) the data-share row is skipped, the extraction rows give the
model-only forward alone, and the stain normalizer runs on synthetic tiles.

Without a CUDA GPU the script prints that nothing was measured and exits 0 at once
(writing no ``--out`` file). A part that fails (out of memory, a missing preset) says so
in its row and the others still run; the exit code is 1 only when nothing could be
measured.

Usage: ``python benchmarks/gpu_check.py [--coords DIR] [--out FILE.md] [--peak-tflops T]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {  # label -> pretraining preset
    "ViT-S/16": ROOT / "configs/pretrain/vits16.yaml",
    "ViT-B/16": ROOT / "configs/pretrain/vitb16.yaml",
    "ViT-L/14": ROOT / "configs/pretrain/vitl14.yaml",
}
TINY = ROOT / "configs/pretrain/tiny-cpu.yaml"
ENCODERS = {  # label -> (timm architecture, its arguments)
    "ViT-B/16": ("vit_base_patch16_224", {}),
    "ViT-L/14": ("vit_large_patch14_dinov2", {"img_size": 224}),
}
# peak dense bf16 tensor-core FLOP/s by device name (upper case), first match wins
PEAK_BF16 = (
    ("H100 PCIE", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),  # also GH200
    ("A100", 312e12),
)
NO_GPU = "gpu_check: no CUDA GPU found (torch.cuda.is_available() is False); nothing was measured."
COLUMNS = ("part", "setup", "rate", "time", "MFU", "peak memory", "notes")
TEACHER_TEMP, MOMENTUM = 0.04, 0.996
MIN_TILES = 2048  # tiles of the extraction run, at least
LR, WEIGHT_DECAY = 1e-4, 0.04


@dataclass
class Row:
    """One row of the result table; ``measured`` is False for skipped or failed parts."""

    part: str
    setup: str = ""
    rate: str = "-"
    time: str = "-"
    mfu: str = "-"
    memory: str = "-"
    notes: str = ""
    measured: bool = False

    def cells(self) -> tuple[str, ...]:
        return (self.part, self.setup, self.rate, self.time, self.mfu, self.memory, self.notes)


class Clock:
    """Elapsed time, the time left of the budget, and progress lines."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def log(self, message: str) -> None:
        print(f"[gpu_check {self.elapsed():5.0f} s] {message}", flush=True)


# -- pure helpers ---------------------------------------------------------------------
def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU by its ``torch.cuda.get_device_name()`` (None: unknown)."""
    name = device_name.upper()
    for key, flops in PEAK_BF16:
        if key in name:
            return flops
    return None


def resolve_peak(device_name: str, override_tflops: float | None) -> tuple[float | None, str]:
    """The peak FLOP/s for MFU (``--peak-tflops`` first, else by name) and a line saying which."""
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (--peak-tflops)"
    flops = peak_flops(device_name)
    if flops is None:
        return None, f"unknown for {device_name}: pass --peak-tflops to get MFU"
    return flops, f"{flops / 1e12:g} TFLOP/s dense bf16 ({device_name})"


def mfu(flops_per_step: float | None, step_s: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the peak (None when either is unknown)."""
    if not flops_per_step or not peak or step_s <= 0:
        return None
    return flops_per_step / step_s / peak


def markdown_table(rows: Iterable[Row]) -> str:
    """The rows as a markdown table (``|`` escaped, one line per row)."""

    def cell(text: str) -> str:
        return " ".join(str(text).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(c) for c in row.cells()) + " |" for row in rows]
    return "\n".join(lines)


def split_batch(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s share of a view-major multi-crop batch: images ``[r B/w, (r+1) B/w)``
    of every view (global ``2B x ...``, local ``nB x ...``, masks ``2B x N``)."""
    b = batch["global"].shape[0] // 2
    if b % world:
        raise ValueError(f"a batch of {b} images does not split over {world} processes")
    h = b // world

    def take(x: torch.Tensor) -> torch.Tensor:
        views = x.shape[0] // b
        x = x.reshape(views, b, *x.shape[1:])  # views x B x ...
        return x[:, rank * h : (rank + 1) * h].reshape(views * h, *x.shape[2:])

    local = batch["local"]
    return {
        "global": take(batch["global"]),
        "masks": take(batch["masks"]),
        "local": take(local) if local.numel() else local,
    }


def synthetic_he(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """``count x 3 x size x size`` uint8 H&E-like tiles: Beer-Lambert mixtures of typical
    haematoxylin and eosin stain vectors with smooth random concentrations, plus noise."""
    import torch.nn.functional as F

    from pipeline.stain.macenko import DEFAULT_STAINS  # 3 x 2 (H, E)

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 2, max(2, size // 16), max(2, size // 16), generator=g)
    conc = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    scale, low = (
        torch.tensor([1.2, 0.8]).view(1, 2, 1, 1),
        torch.tensor([0.2, 0.3]).view(1, 2, 1, 1),
    )
    conc = conc * scale + low  # count x 2 x size x size: H in [0.2, 1.4], E in [0.3, 1.1]
    od = torch.einsum("cs,bshw->bchw", DEFAULT_STAINS, conc)  # count x 3 x size x size
    rgb = 240.0 * torch.exp(-od) + 3.0 * torch.randn(od.shape, generator=g)
    return rgb.clamp(0, 255).round().to(torch.uint8)


# -- GPU helpers ----------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "-"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def median_time(
    fn: Callable[[], object], device: torch.device, steps: int, warmup: int, cap_s: float = 60.0
) -> float:
    """Median seconds of ``fn`` over up to ``steps`` synchronised calls after ``warmup`` calls
    (at least 3 timed calls, fewer than ``steps`` when they take longer than ``cap_s``)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, start = [], time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 3 and time.perf_counter() - start > cap_s:
            break
    return statistics.median(times)


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of ``fn`` as ``FlopCounterMode`` counts them (matmul, conv, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- pretraining ----------------------------------------------------------------------
def load_preset(path: Path, **overrides):
    """A :class:`PretrainConfig` from a preset, as ``benchmarks/ssl_speed.py`` loads it."""
    from pipeline.config import load_config
    from pipeline.ssl.pretrain import PretrainConfig

    if not Path(path).is_file():
        raise FileNotFoundError(f"no preset {path}")
    return load_config(PretrainConfig, path, **overrides)


def build_module(cfg, device: torch.device):
    """The DINOv2 module of a preset on ``device`` and its AdamW (each group's lr set)."""
    from pipeline.ssl.module import DINOv2Module

    module = DINOv2Module.from_configs(cfg.model, cfg.loss, cfg.optim, cfg.trainer.max_steps)
    module.to(device)
    optimizer = module.configure_optimizers()
    for group in optimizer.param_groups:  # what the schedules set in training
        group["lr"] = LR * group.get("lr_mult", 1.0)
        group["weight_decay"] = WEIGHT_DECAY * group.get("wd_mult", 1.0)
    return module, optimizer


def make_step(module, optimizer, device: torch.device, bf16: bool) -> Callable[[dict], None]:
    """One full training step on a batch: losses, backward, per-part gradient clipping,
    AdamW, teacher EMA."""

    def step(batch: dict[str, torch.Tensor]) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            terms, _, _ = module.ssl_losses(batch, TEACHER_TEMP)
            loss = sum(terms.values())
        loss.backward()
        module.clip_gradients_per_part()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.update_teacher(MOMENTUM)

    return step


def synthetic_batch(cfg, patch: int, b: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A multi-crop batch of ``b`` images of random crops on ``device``; the iBOT masks come
    from the data pipeline's own ``Collate`` (the training masks' statistics)."""
    from pipeline.ssl.data import Collate

    d = cfg.data
    grid = d.global_size // patch
    dummy = torch.zeros(1)
    items = [([dummy, dummy], [dummy] * d.local_crops) for _ in range(b)]
    masks = Collate((grid, grid), cfg.loss)(items)["masks"]  # 2B x N bool
    g, s = d.global_size, d.local_size
    local = (
        torch.randn(d.local_crops * b, 3, s, s, device=device)
        if d.local_crops
        else torch.zeros(0, device=device)
    )
    return {
        "global": torch.randn(2 * b, 3, g, g, device=device),  # 2B x 3 x G x G
        "local": local,  # nB x 3 x L x L
        "masks": masks.to(device),
    }


def crops(cfg) -> str:
    d = cfg.data
    return f"2 x {d.global_size} + {d.local_crops} x {d.local_size} px, {cfg.trainer.precision}"


def ssl_part(
    label: str, preset: Path, device: torch.device, peak: float | None, steps: int, warmup: int
) -> Row:
    """Speed, MFU and peak memory of a preset's full step on synthetic crops."""
    cfg = load_preset(preset)
    module, optimizer = build_module(cfg, device)
    patch = module.student.backbone.patch_size
    step = make_step(module, optimizer, device, "bf16" in cfg.trainer.precision)
    preset_b = b = cfg.data.batch_size
    while True:  # the preset's batch, halved while it does not fit
        free_memory()
        batch, oom = None, False
        try:
            batch = synthetic_batch(cfg, patch, b, device)
            for _ in range(2):
                step(batch)
            sync(device)
        except torch.cuda.OutOfMemoryError:
            oom = True
        if not oom:
            break
        batch = None
        optimizer.zero_grad(set_to_none=True)
        if b == 1:
            raise torch.cuda.OutOfMemoryError(f"{label}: out of memory at a batch of 1")
        b //= 2
    flops, flop_note = None, ""
    try:
        flops = count_flops(lambda: step(batch))
    except Exception as exc:  # MFU is then unknown; the timing still stands
        flop_note = f"FLOP count failed: {type(exc).__name__}: {exc}"
    seconds = median_time(lambda: step(batch), device, steps, warmup=max(0, warmup - 2))
    util = mfu(flops, seconds, peak)
    batch_text = f"batch {b}" + (f" (preset {preset_b}: out of memory)" if b != preset_b else "")
    notes = (
        f"{flops / 1e12:.3g} TFLOP per step (FlopCounterMode), {flops / seconds / 1e12:.3g} TFLOP/s"
        if flops
        else flop_note
    )
    return Row(
        f"SSL step {label}",
        f"{preset.name}: {cfg.model.arch}, {batch_text}, {crops(cfg)}",
        f"{b / seconds:.0f} images/s",
        f"{seconds * 1e3:.0f} ms/step",
        f"{100 * util:.1f} %" if util is not None else "n/a",
        peak_memory(device),
        notes,
        measured=True,
    )


def data_part(
    preset: Path, coords: Path, device: torch.device, steps: int, cap_s: float = 60.0
) -> Row:
    """The data pipeline's share of a ViT-B/16 step: the real DataLoader against synthetic
    crops already on the GPU, over the same number of steps."""
    part = "SSL data share ViT-B/16"
    if not coords.exists():
        return Row(
            part,
            preset.name,
            notes=f"skipped: no coords at {coords} (run `cpath demo --stop-after preprocess`)",
        )
    from pipeline.ssl.data import PretrainDataModule

    preset_workers = load_preset(preset).data.workers
    workers = max(0, min(preset_workers, os.cpu_count() or 1))
    cfg = load_preset(preset, **{"data.coords": str(coords), "data.workers": workers})
    module, optimizer = build_module(cfg, device)
    patch = module.student.backbone.patch_size
    step = make_step(module, optimizer, device, "bf16" in cfg.trainer.precision)
    b = cfg.data.batch_size
    warmup = max(3, 2 * workers)  # drains the batches prepared while the workers started
    dm = PretrainDataModule(cfg.data, cfg.loss, patch, warmup + steps)
    dm.setup()
    tiles, slides = len(dm.dataset), dm.dataset.slides
    loader = dm.train_dataloader_for(warmup + steps)
    it = iter(loader)

    def real_step() -> None:
        batch = next(it)
        step({k: v.to(device, non_blocking=True) for k, v in batch.items()})

    def run(fn: Callable[[], None], count: int) -> tuple[float, int]:
        """Mean seconds per call of ``count`` calls (fewer when past ``cap_s``)."""
        sync(device)
        start, done = time.perf_counter(), 0
        while done < count:
            fn()
            done += 1
            if done >= 3 and time.perf_counter() - start > cap_s:
                break
        sync(device)
        return (time.perf_counter() - start) / done, done

    first = time.perf_counter()
    real_step()
    first = time.perf_counter() - first
    run(real_step, warmup - 1)
    real_s, timed = run(real_step, steps)
    it = loader = dm = None
    gc.collect()  # the loader's workers end here
    batch = synthetic_batch(cfg, patch, b, device)
    run(lambda: step(batch), 3)
    synthetic_s, _ = run(lambda: step(batch), timed)
    share = max(0.0, 1 - synthetic_s / real_s)
    return Row(
        part,
        f"{preset.name}, batch {b}, {crops(cfg)}, {workers} workers (preset "
        f"{preset_workers}), {tiles} tiles of {slides} slides in {coords}",
        f"real {b / real_s:.0f} / synthetic {b / synthetic_s:.0f} images/s",
        f"{real_s * 1e3:.0f} / {synthetic_s * 1e3:.0f} ms/step",
        "-",
        peak_memory(device),
        f"data share {100 * share:.0f} % of a step (1 - synthetic/real, {timed} steps "
        f"after {warmup} warm-up; first batch after {first:.1f} s)",
        measured=True,
    )


# -- extraction and stain normalisation -------------------------------------------------
def encoder_spec(label: str, folder: Path) -> str:
    """The encoder of ``label`` as ``load_encoder`` and ``ExtractConfig`` name it: ``timm:``
    when the architecture's default input is what we measure, else a random-init folder
    (``random:``) whose config sets the input size (``timm:`` takes no model arguments
    through ``ExtractConfig`` and would resize tiles to the model's default size)."""
    from pipeline.encoders import IMAGENET_MEAN, IMAGENET_STD

    arch, kwargs = ENCODERS[label]
    if not kwargs:
        return f"timm:{arch}"
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architecture": arch,
        "model_args": {**kwargs, "num_classes": 0},
        "input_size": int(kwargs.get("img_size", 224)),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return f"random:{folder}"


def tile_subset(coords_dir: Path, tiles: int, folder: Path) -> tuple[int, int]:
    """Coords files in ``folder`` with ``tiles`` tiles of the slides of ``coords_dir`` in file
    order (as ``extract_speed.subset``); the slides are listed again, under new slide ids,
    while they hold fewer. Returns (distinct slides, passes over them)."""
    import numpy as np

    from pipeline.wsi.coords import list_coords_files, read_coords, write_coords

    tables = [(p, read_coords(p)) for p in list_coords_files(coords_dir)]
    tables = [(p, t) for p, t in tables if len(t)]
    if not tables:
        raise ValueError(f"{coords_dir}: no tiles")
    left, copy = tiles, 0
    while left > 0:
        for path, t in tables:
            if left <= 0:
                break
            n = min(left, len(t))
            slide_id = f"{t.attrs.get('slide_id') or path.stem}-{copy}"
            fraction = t.tissue_fraction[:n] if t.tissue_fraction is not None else np.ones(n)
            write_coords(
                folder / f"{slide_id}.h5", t.coords[:n], fraction, {**t.attrs, "slide_id": slide_id}
            )
            left -= n
        copy += 1
    return len(tables), copy


def tile_size(coords: Path) -> int:
    from pipeline.wsi.coords import list_coords_files, read_coords

    return int(read_coords(list_coords_files(coords)[0]).patch_size)


def model_only_rate(encoder, images: torch.Tensor, device: torch.device, steps: int) -> float:
    """Tiles/s of ``encoder.embed`` on ``images`` already on the device (bf16 autocast)."""

    def forward() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            encoder.embed(images).float().cpu()

    return images.shape[0] / median_time(forward, device, steps, warmup=3)


def extraction_part(
    label: str,
    coords: Path,
    device: torch.device,
    batch: int,
    workers: int,
    steps: int,
    workdir: Path,
) -> Row:
    """Tiles/s of ``extract`` on real tiles against a model-only forward of the same size."""
    from pipeline.encoders import load_encoder

    part = f"extraction {label}"
    spec = encoder_spec(label, workdir / f"encoder-{label.replace('/', '')}")
    has_coords = coords.exists()
    size = tile_size(coords) if has_coords else 224
    encoder = load_encoder(spec, device=device)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    model_rate = model_only_rate(encoder, images, device, steps)
    setup = f"{spec.split(':')[0]}:{ENCODERS[label][0]} at {encoder.input_size} px, batch {batch}"
    del encoder, images
    free_memory()
    if not has_coords:
        return Row(
            part,
            f"{setup}, {size}-px random tiles",
            f"model-only {model_rate:.0f} tiles/s",
            notes=f"pipeline skipped: no coords at {coords} (run `cpath demo "
            "--stop-after preprocess`)",
            measured=True,
        )
    from pipeline.extract import ExtractConfig
    from pipeline.extraction import extract

    folder = workdir / f"coords-{label.replace('/', '')}"
    folder.mkdir(parents=True)
    n = max(MIN_TILES, 4 * workers * batch)  # several batches per worker: start-up amortised
    slides, passes = tile_subset(coords, n, folder)
    cfg = ExtractConfig(
        coords=folder,
        encoder=spec,
        out=folder.parent / f"features-{folder.name}",
        batch_size=batch,
        workers=workers,
        device=str(device),
        precision="bf16",
        progress=False,
        overwrite=True,
    )
    start = time.perf_counter()
    rows = extract(cfg)
    loop = sum(r["seconds"] for r in rows)  # first batch to the last file
    startup = time.perf_counter() - start - loop
    failed = [r for r in rows if r["status"] != "done"]
    if failed:
        raise RuntimeError(f"{len(failed)} slides not extracted: {failed[0]['error']}")
    rate = n / loop
    return Row(
        part,
        f"{setup}, {workers} workers, {n} tiles of {size} px ({passes} passes over "
        f"{slides} slides)",
        f"pipeline {rate:.0f} / model-only {model_rate:.0f} tiles/s",
        f"{loop:.1f} s for {n} tiles (start-up {startup:.0f} s)",
        "-",
        peak_memory(device),
        f"ratio pipeline / model-only {rate / model_rate:.2f}",
        measured=True,
    )


def stain_tiles(coords: Path, count: int) -> tuple[torch.Tensor, list[torch.Tensor], str]:
    """``count x 3 x H x W`` uint8 tiles to normalise, the tiles to fit to, and their source:
    real tiles spread over the slides of ``coords``, else synthetic H&E-like tiles."""
    import numpy as np

    if coords.exists():
        from pipeline.data.tiles import TileDataset
        from pipeline.wsi.coords import list_coords_files

        dataset = TileDataset(list_coords_files(coords))
        index = np.linspace(0, len(dataset) - 1, count).round().astype(int)
        batch = torch.stack([dataset[int(i)]["image"] for i in index])  # B x 3 x H x W uint8
        dataset.close()
        return batch, list(batch[:: max(1, count // 16)]), f"real tiles of {coords}"
    batch = synthetic_he(count, 224)
    return batch, list(batch[:16]), "synthetic H&E-like tiles"


def stain_part(coords: Path, device: torch.device, batch: int, steps: int, workdir: Path) -> Row:
    """Macenko normalisation against the ViT-B/16 forward of the same batch, ms per batch."""
    from pipeline.encoders import load_encoder
    from pipeline.stain.macenko import MacenkoNormalizer

    images, targets, source = stain_tiles(coords, batch)
    try:
        normalizer = MacenkoNormalizer().fit(targets)
    except ValueError:  # too little tissue in the real tiles to fit to
        normalizer = MacenkoNormalizer().fit(list(synthetic_he(16, 224)))
        source += " (fitted to synthetic H&E-like tiles)"
    normalizer.to(device)
    images = images.to(device)
    encoder = load_encoder(encoder_spec("ViT-B/16", workdir / "encoder-stain"), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def stain() -> None:
        with torch.inference_mode(), autocast:
            normalizer(images)

    def forward() -> None:
        with torch.inference_mode(), autocast:
            encoder.embed(images).float().cpu()

    stain_s = median_time(stain, device, steps, warmup=2)
    forward_s = median_time(forward, device, steps, warmup=3)
    share = stain_s / (stain_s + forward_s)
    passed = normalizer.passthrough / max(1, normalizer.seen)
    h, w = images.shape[-2:]
    return Row(
        "stain share (Macenko)",
        f"batch {batch} of {h} x {w} px, {source}; ViT-B/16 bf16 forward",
        "-",
        f"Macenko {stain_s * 1e3:.1f} / forward {forward_s * 1e3:.1f} ms per batch",
        "-",
        peak_memory(device),
        f"normalisation {100 * share:.0f} % of normalisation + forward "
        f"({100 * passed:.0f} % of tiles passed through unchanged)",
        measured=True,
    )


# -- DDP equality -----------------------------------------------------------------------
def tiny_step(device: torch.device, rank: int = 0, world: int = 1) -> dict:
    """One fp32 step of the tiny preset on a fixed batch (``rank``'s half of it under DDP
    when ``world`` > 1): the student's gradients and every parameter after the step."""
    from torch.nn.parallel import DistributedDataParallel

    cfg = load_preset(TINY, **{"loss.koleo_weight": 0.0, "loss.kde_weight": 0.0})
    torch.manual_seed(0)  # the same initial weights in every process
    module, optimizer = build_module(cfg, device)
    module.forward = lambda batch: sum(module.ssl_losses(batch, TEACHER_TEMP)[0].values())
    d, patch = cfg.data, module.student.backbone.patch_size
    b, n = d.batch_size, (d.global_size // patch) ** 2
    g = torch.Generator().manual_seed(1)
    masks = torch.zeros(2 * b, n, dtype=torch.bool)
    for i in range(2 * b):  # every global crop masked, so each half holds as many masked crops
        masks[i, : 1 + (5 * i) % (n // 2)] = True
    batch = {
        "global": torch.randn(2 * b, 3, d.global_size, d.global_size, generator=g),
        "local": torch.randn(d.local_crops * b, 3, d.local_size, d.local_size, generator=g),
        "masks": masks,
    }
    batch = {k: v.to(device) for k, v in split_batch(batch, rank, world).items()}
    ids = [device.index] if device.type == "cuda" else None
    model = DistributedDataParallel(module, device_ids=ids) if world > 1 else module
    model(batch).backward()
    grads = {
        name: p.grad.detach().cpu().clone()
        for name, p in module.student.named_parameters()
        if p.grad is not None
    }
    optimizer.step()
    module.update_teacher(MOMENTUM)
    params = {name: p.detach().cpu().clone() for name, p in module.named_parameters()}
    return {"grads": grads, "params": params, "images": b // world}


def exact_math() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    """One of ``world`` NCCL processes of :func:`ddp_part`; rank 0 saves its result."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    exact_math()
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        result = tiny_step(torch.device("cuda", rank), rank, world)
        if rank == 0:
            torch.save(result, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise ValueError(f"different tensors: {sorted(set(a) ^ set(b))[:4]}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def ddp_part(workdir: Path, timeout_s: float = 180.0) -> Row:
    """One tiny-preset step in 1 process on the whole batch against 2 DDP processes on halves."""
    part = "DDP 1 vs 2 GPUs"
    if torch.cuda.device_count() < 2:
        return Row(part, TINY.name, notes="skipped: 1 GPU")
    import torch.multiprocessing as mp

    matmul_tf32, cudnn_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    exact_math()
    try:
        single = tiny_step(torch.device("cuda", 0))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    out = workdir / "ddp-rank0.pt"
    context = mp.start_processes(
        _ddp_worker, args=(2, free_port(), str(out)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.perf_counter() + timeout_s
    while not context.join(timeout=5):
        if time.perf_counter() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"the 2 DDP processes did not finish in {timeout_s:.0f} s")
    ddp = torch.load(out, weights_only=True)
    grad_diff = max_difference(single["grads"], ddp["grads"])
    grad_max = max(float(g.abs().max()) for g in single["grads"].values())
    param_diff = max_difference(single["params"], ddp["params"])
    verdict = "equal up to rounding" if grad_diff <= 1e-4 * grad_max else "DIFFERENT"
    return Row(
        part,
        f"{TINY.name} (KoLeo off), fp32, TF32 off, NCCL: batch {single['images']} in "
        f"1 process vs 2 x {ddp['images']}",
        "-",
        "-",
        "-",
        "-",
        f"{verdict}: max abs difference of the gradients {grad_diff:.2e} (largest "
        f"gradient {grad_max:.2e}); of the parameters after AdamW + EMA {param_diff:.2e} "
        f"(AdamW's first step moves a weight by up to lr = {LR:g} whatever its gradient's "
        "size, so gradients near AdamW's eps can differ by that much)",
        measured=True,
    )


# -- main -------------------------------------------------------------------------------
def machine_line(device: torch.device, peak_text: str) -> str:
    """GPUs and their memory, library versions, CPUs, and the peak used for MFU."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpus = f"{torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        gpus = f"no GPU ({device.type})"
    return (
        f"Machine: {gpus}, "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version()}, {os.cpu_count()} CPUs; MFU peak: {peak_text}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--coords",
        default=str(ROOT / "runs/demo/preprocess/coords"),
        help="coords folder of `cpath preprocess` (real tiles)",
    )
    parser.add_argument("--out", default=None, help="also write the table to this file")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak dense bf16 TFLOP/s of the GPU for MFU (default: by name)",
    )
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up steps per measurement")
    parser.add_argument("--batch-size", type=int, default=256, help="extraction/stain batch")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, min(16, (os.cpu_count() or 2) - 2)),
        help="extraction DataLoader workers",
    )
    parser.add_argument(
        "--budget-s", type=float, default=400.0, help="start no new part after this many seconds"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(NO_GPU, flush=True)
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return run_checks(args, torch.device("cuda", 0))


def run_checks(args: argparse.Namespace, device: torch.device) -> int:
    """Every part on ``device``, one row each; print (and write) the table. Returns the exit
    code: 0 when anything was measured."""
    clock = Clock(args.budget_s)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    peak, peak_text = resolve_peak(name, args.peak_tflops)
    machine = machine_line(device, peak_text)
    print(machine, flush=True)
    coords = Path(args.coords)
    rows: list[Row] = []

    def part(name: str, setup: str, need_s: float, fn: Callable[[], Row]) -> None:
        """Run one part into ``rows``: its row, or a row saying why it failed or was skipped."""
        if clock.left() < need_s:
            rows.append(
                Row(
                    name,
                    setup,
                    notes=f"skipped: time budget ({max(0, clock.left()):.0f} "
                    f"s of {args.budget_s:.0f} s left, needs about {need_s:.0f} s)",
                )
            )
            clock.log(f"{name}: skipped (time budget)")
            return
        clock.log(f"{name}: start")
        try:
            rows.append(fn())
            clock.log(f"{name}: {rows[-1].rate}; {rows[-1].time}; {rows[-1].notes}")
        except Exception as exc:  # one part's failure (OOM, missing preset) ends that part only
            clock.log(f"{name}: failed\n{traceback.format_exc()}")
            rows.append(Row(name, setup, notes=f"failed: {type(exc).__name__}: {exc}"[:300]))
        finally:
            free_memory()

    s, w, b = args.steps, args.warmup, args.batch_size
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        for label, preset in PRESETS.items():
            part(
                f"SSL step {label}",
                preset.name,
                30,
                lambda label=label, preset=preset: ssl_part(label, preset, device, peak, s, w),
            )
        part(
            "SSL data share ViT-B/16",
            PRESETS["ViT-B/16"].name,
            90,
            lambda: data_part(PRESETS["ViT-B/16"], coords, device, max(s, 20)),
        )
        for label in ENCODERS:
            part(
                f"extraction {label}",
                ENCODERS[label][0],
                60,
                lambda label=label: extraction_part(
                    label, coords, device, b, args.workers, s, work
                ),
            )
        part(
            "stain share (Macenko)",
            f"batch {b}",
            20,
            lambda: stain_part(coords, device, b, s, work),
        )
        ddp_need = 60 if torch.cuda.device_count() > 1 else 0
        part("DDP 1 vs 2 GPUs", TINY.name, ddp_need, lambda: ddp_part(work))

    table = markdown_table(rows)
    print(f"\n{machine}\n\n{table}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(f"{machine}\n\n{table}\n")
        print(f"wrote {args.out}", flush=True)
    clock.log("done")
    return 0 if any(r.measured for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
