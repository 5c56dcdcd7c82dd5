"""Extraction speed: end-to-end ``extract`` against a model-only forward, and memory vs slide size.

One run measures, on the same device, batch size and precision:

- model-only: ``encoder.embed`` on a batch of uint8 tiles already in memory, repeated;
- end to end: ``pipeline.extraction.extract`` on the demo cohort's coords (tile reading in
  DataLoader workers, transfer, stain normalization if any, forward, h5 writing);
- with ``--stain-norm stain.json``: the share of a step (normalization + forward on the
  same in-memory batch of real tiles) taken by stain normalization on the device;
- peak host memory of extraction for one slide's coords repeated to 1x and 8x the tiles
  (each in a fresh process), to show memory does not grow with the slide.

Usage: ``python benchmarks/extract_speed.py [--encoder timm:vit_small_patch16_224]
[--device cuda] [--batch-size 64] [--tiles 512] [--stain-norm stain.json]``; for a model of
the zoo without its weights at hand, ``--encoder kaiko-vits16 --random-weights`` writes
random weights of its architecture to a temporary file (speed only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.data.tiles import TileDataset
from pipeline.encoders import load_encoder
from pipeline.extract import ExtractConfig, resolve_device
from pipeline.extraction import AUTOCAST, extract
from pipeline.stain.base import load_normalizer
from pipeline.wsi.coords import list_coords_files, read_coords, write_coords

ROOT = Path(__file__).resolve().parents[1]


def subset(coords_dir: Path, tiles: int, folder: Path) -> int:
    """Coords files of the first slides, cut so that they hold ``tiles`` tiles in all."""
    left = tiles
    for path in list_coords_files(coords_dir):
        if left <= 0:
            break
        t = read_coords(path)
        n = min(left, len(t))
        write_coords(folder / path.name, t.coords[:n], t.tissue_fraction[:n], t.attrs)
        left -= n
    return tiles - left


def peak_memory(
    coords: Path, encoder: str, device: str, batch: int, workers: int, weights: str | None
) -> float:
    """Peak resident memory (MiB, VmHWM) of one extraction in a fresh process."""
    code = (
        "import json,sys,resource\n"
        "from pipeline.extract import ExtractConfig\nfrom pipeline.extraction import extract\n"
        f"extract(ExtractConfig(coords={str(coords)!r}, encoder={encoder!r}, encoder_weights={weights!r}, out={str(coords.parent / 'mem')!r},"
        f" device={device!r}, batch_size={batch}, workers={workers}, progress=False, overwrite=True))\n"
        "print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def random_zoo_weights(name: str) -> str:
    """Random weights for the zoo model ``KEY[:MODE]`` in a temporary place, in its published
    layout: a safetensors file, or a ``save_pretrained`` folder for ``transformers`` models."""
    from safetensors.torch import save_file

    from pipeline.encoders import build_zoo_model
    from pipeline.encoders.zoo import spec

    net = build_zoo_model(name.split(":")[0])
    path = Path(tempfile.mkdtemp()) / "random"
    if spec(name.split(":")[0]).loader == "transformers":
        net.backbone.save_pretrained(path)
        return str(path)
    path = path.with_suffix(".safetensors")
    save_file({k: v.contiguous() for k, v in net.backbone.state_dict().items()}, str(path))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="timm:vit_small_patch16_224")
    parser.add_argument("--coords", default=str(ROOT / "runs/demo/preprocess/coords"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tiles", type=int, default=512)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--stain-norm", default=None, help="a stain normalizer JSON")
    parser.add_argument(
        "--random-weights", action="store_true", help="a zoo key with random weights (speed only)"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    weights = random_zoo_weights(args.encoder) if args.random_weights else None
    encoder = load_encoder(args.encoder, weights=weights, device=device)
    size = read_coords(list_coords_files(args.coords)[0]).patch_size
    tiles = TileDataset(list_coords_files(args.coords))
    batch = torch.stack([tiles[i % len(tiles)]["image"] for i in range(args.batch_size)])
    batch = batch.to(device)  # b x 3 x H x W uint8, real tiles
    stain = load_normalizer(args.stain_norm, device=device) if args.stain_norm else None
    autocast = torch.autocast(
        device.type,
        dtype=AUTOCAST.get(args.precision, torch.float32),
        enabled=args.precision in AUTOCAST,
    )
    steps = max(1, args.tiles // args.batch_size)

    def model_only(normalizer=None) -> None:
        with torch.inference_mode(), autocast:
            for _ in range(steps):
                images = normalizer(batch) if normalizer is not None else batch
                encoder.embed(images).float().cpu()

    def model_rate(normalizer=None) -> float:
        start = time.perf_counter()
        model_only(normalizer)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return steps * args.batch_size / (time.perf_counter() - start)

    model_only(stain)  # warm-up

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "coords"
        folder.mkdir()
        n = subset(Path(args.coords), steps * args.batch_size, folder)
        models, e2e, startups = [], [], []
        for round_ in range(3):  # alternate the two, medians: this machine's speed drifts
            models.append(model_rate())
            cfg = ExtractConfig(
                coords=folder,
                encoder=args.encoder,
                encoder_weights=weights,
                out=Path(tmp) / f"f{round_}",
                batch_size=args.batch_size,
                workers=args.workers,
                device=str(device),
                precision=args.precision,
                progress=False,
                stain_norm=args.stain_norm,
            )
            start = time.perf_counter()
            rows = extract(cfg)
            loop = sum(r["seconds"] for r in rows)  # first batch to the last file
            e2e.append(n / loop)
            startups.append(time.perf_counter() - start - loop)
        model_rate_, e2e_rate = statistics.median(models), statistics.median(e2e)
        startup = statistics.median(startups)
        print(
            f"{args.encoder} on {device} ({torch.get_num_threads()} threads), batch "
            f"{args.batch_size}, {args.precision}, {size}-px tiles, {args.workers} workers"
        )
        print(f"  model-only forward   {model_rate_:8.1f} tiles/s (median of 3)")
        print(
            f"  end-to-end extract   {e2e_rate:8.1f} tiles/s ({n} tiles, median of 3; start-up {startup:.1f} s)"
        )
        print(f"  ratio                {e2e_rate / model_rate_:8.2f}")
        if stain is not None:  # normalization's share of a step, alternating the two
            plain, normed = [], []
            for _ in range(3):
                plain.append(model_rate())
                normed.append(model_rate(stain))
            share = 1 - statistics.median(normed) / statistics.median(plain)
            print(
                f"  stain normalization  {100 * share:8.1f} % of a step ({stain.method}, "
                f"{statistics.median(normed):.1f} vs {statistics.median(plain):.1f} tiles/s)"
            )

        # memory vs slide size: one slide's coords repeated 1x and 8x
        base = read_coords(list_coords_files(args.coords)[0])
        for factor in (1, 8):
            one = Path(tmp) / f"x{factor}"
            one.mkdir()
            coords = np.tile(base.coords, (factor, 1))
            write_coords(one / "slide.h5", coords, np.ones(len(coords), np.float32), base.attrs)
            mib = peak_memory(
                one, args.encoder, str(device), args.batch_size, args.workers, weights
            )
            print(f"  peak memory, {len(coords):6d} tiles  {mib:8.0f} MiB")


if __name__ == "__main__":
    main()
