"""``cpath extract``: frozen encoder -> per-slide feature files (h5), streamed and resumable.

    cpath extract --coords runs/prep/coords --encoder models/run/encoder --out runs/feats
    cpath extract --coords ... --encoder timm:vit_base_patch16_224 --encoder-weights vitb.safetensors
    torchrun --nproc_per_node 8 -m pipeline extract --coords ... --encoder ... --out ...

Every slide's tiles are read by one long-lived DataLoader (workers kept across slides,
pinned memory), embedded under ``torch.inference_mode`` with autocast on the device and
streamed into ``OUT/<slide_id>.h5`` (see :mod:`pipeline.features`). Batches never mix
slides, so a slide's features do not depend on which other slides a process handles:
a 1-process and a 2-process run write identical files. Slides are split over processes
by ``--shard i/n``, torchrun's ``RANK``/``WORLD_SIZE``, srun tasks or SLURM array ids.
Finished slides are skipped on a rerun (same encoder weights, pooling, precision and
coords); a slide that cannot be read fails alone, the others finish.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

MANIFEST_FIELDS = ["slide_id", "status", "n_tiles", "seconds", "path", "error"]


@dataclass
class ExtractConfig:
    """Extract tile features of every slide with a frozen encoder.

    Args:
        coords: coords folder of `cpath preprocess` (or one .h5, or a text list of them).
        encoder: required: an exported folder (`cpath pretrain`), timm:<arch> with
            --encoder_weights, hf-hub:<org>/<name>, or a zoo model KEY or KEY:MODE
            (`cpath encoders`, e.g. virchow2:cls) with --encoder_weights. timm:<arch>
            without weights and random:<folder> are random-init baselines: logged as a
            warning and marked `weights: random` in every feature file.
        encoder_weights: local weights for a timm:<arch> or zoo encoder or, of the same
            architecture, for an exported folder (safetensors or torch file).
        weights_map: YAML file of `key: path` lines giving zoo encoders their weights
            (default: the file named by $CPATH_WEIGHTS).
        slides: where the slides are (a folder, glob or CSV, as for preprocess), matched to
            the coords by slide id: for coords that do not name their slide (CLAM) or
            slides that moved since preprocessing.
        out: folder of the feature files (<slide_id>.h5), manifest.csv and config.yaml.
        batch_size: tiles per forward pass.
        workers: DataLoader worker processes reading tiles.
        precision: autocast dtype of the forward pass (bf16, fp16) or fp32.
        dtype: stored feature dtype. float16 halves the files; a slide whose features do not
            fit float16 (|x| > 65504) fails with a message. auto: float16, or float32 for a
            slide whose features do not fit. Non-finite features (NaN, inf) always fail.
        pooling: cls (the model's pooled output), mean (of patch tokens) or cls+mean.
        stain_norm: stain normalizer applied on the device first: a JSON file (`cpath stain
            --action fit`) or a preset (exapath). Unset: the normalizer the encoder was
            pretrained with, if its folder records one (`cpath pretrain --data.stain_norm`),
            else none; none: raw tiles (a warning when the encoder was pretrained on
            normalised ones).
        shard: "i/n" to process every n-th slide from i (default: from torchrun or SLURM).
        device: auto (the local GPU of this rank, else CPU), cpu, cuda, cuda:1, ...
        seed: seed of random-init encoders (timm:<arch> without weights).
        overwrite: redo slides whose feature files are complete.
        progress: show a progress bar.
    """

    coords: Path | None = None
    encoder: str | None = None
    encoder_weights: Path | None = None
    weights_map: Path | None = None
    slides: str | None = None
    out: Path = Path("features")
    batch_size: int = 256
    workers: int = 4
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    dtype: Literal["float16", "float32", "auto"] = "float16"
    pooling: Literal["cls", "mean", "cls+mean"] = "cls"
    stain_norm: Path | None = None
    shard: str | None = None
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False
    progress: bool = True


def resolve_device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return torch.device("cuda", local % torch.cuda.device_count())
    return torch.device("cpu")


def state_sha256(model) -> str:
    """SHA-256 of a model's parameters and buffers (names, shapes and bytes)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run(cfg: ExtractConfig) -> int:
    from pipeline.extraction import extract

    start = time.perf_counter()
    rows = extract(cfg)
    status = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
    tiles = sum(int(r["n_tiles"]) for r in rows if r["status"] == "done")
    print(
        f"extract: {status['done']} done ({tiles} tiles), {status['skipped']} skipped, "
        f"{status['failed']} failed in {time.perf_counter() - start:.1f} s -> {cfg.out}"
    )
    for r in rows:
        if r["status"] == "failed":
            print(f"  failed {r['slide_id']}: {r['error']}")
    return 1 if status["failed"] else 0
