"""The extraction loop behind ``cpath extract`` (see :mod:`pipeline.extract`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipeline.config import save_config
from pipeline.encoders import Encoder, load_encoder
from pipeline.errors import ConfigError, PipelineError
from pipeline.extract import MANIFEST_FIELDS, ExtractConfig, resolve_device, state_sha256
from pipeline.features import FeatureWriter, is_complete
from pipeline.io import remove_temporaries, sha256_file, shard_suffix, write_manifest
from pipeline.stain.base import load_normalizer
from pipeline.wsi.coords import Coords, list_coords_files, read_coords, reader_attrs
from pipeline.wsi.reader import Slide
from pipeline.wsi.slides import list_slides, parse_shard

log = logging.getLogger(__name__)
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Job:
    """One slide to extract."""

    slide_id: str
    coords_file: Path
    table: Coords
    out: Path
    attrs: dict
    slide_path: Path


class SlideBatches(Dataset):
    """Item ``i`` is batch ``i``: up to ``batch_size`` consecutive tiles of one slide, read
    in a worker. A read error is returned (not raised) so that the slide fails alone."""

    def __init__(self, jobs: list[Job], batch_size: int):
        self.jobs = jobs
        self.batches = [
            (j, s, min(s + batch_size, len(job.table)))
            for j, job in enumerate(jobs)
            for s in range(0, len(job.table), batch_size)
        ]
        self._slide: tuple[int, Slide] | None = None
        self._failed: dict[int, str] = {}  # job -> error, in this worker: not read again

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        j, start, stop = self.batches[i]
        job = self.jobs[j]
        if j in self._failed:
            return {
                "job": j,
                "start": start,
                "n": stop - start,
                "images": None,
                "error": self._failed[j],
            }
        try:
            if self._slide is None or self._slide[0] != j:
                self.close()
                self._slide = (
                    j,
                    Slide(job.slide_path, level0_mpp=job.table.attrs.get("level0_mpp")),
                )
            slide, t = self._slide[1], job.table
            size0, size = t.patch_size_level0, t.patch_size
            tiles = [
                slide.read_tile_chw((int(x), int(y)), (size0, size0), (size, size))
                for x, y in t.coords[start:stop]
            ]
            images = torch.from_numpy(np.stack(tiles))  # b x 3 x H x W uint8
            return {"job": j, "start": start, "n": stop - start, "images": images, "error": None}
        except Exception as exc:  # any unreadable slide or region fails its slide only
            self.close()
            self._failed[j] = error = f"{type(exc).__name__}: {exc}"
            return {"job": j, "start": start, "n": stop - start, "images": None, "error": error}

    def close(self) -> None:
        """Close the open slide, if any."""
        if self._slide is not None:
            slide, self._slide = self._slide[1], None
            slide.close()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slide": None}


def choose_stain_norm(value, encoder: Encoder) -> tuple[dict | None, str, str]:
    """The stain normalizer of an extraction: ``(its {"method", "params"} or None, the name
    feature files record, its digest)``.

    ``value`` is ``--stain_norm``: None applies the normalizer the encoder was pretrained
    with, if its folder records one (``cpath pretrain --data.stain_norm``, e.g. the EXAPath
    preset), so features see tiles as pretraining did; ``none`` extracts raw tiles; a file
    or preset name applies that one. Departing from the encoder's own is logged as a warning.
    """
    from pipeline.stain.presets import body_sha256, normalizer_body, preset_name

    recorded = (encoder.config.get("export") or {}).get("stain_norm")
    if value is None:
        if recorded is None:
            return None, "", ""
        body = {"method": recorded["method"], "params": recorded["params"]}
        log.info(
            "extract: applying the stain normalizer %s was pretrained with (%s); "
            "--stain_norm none extracts raw tiles",
            encoder.name,
            recorded.get("source") or recorded["method"],
        )
        return body, f"encoder:{recorded.get('source') or recorded['method']}", body_sha256(body)
    text = str(value)
    if text.lower() == "none":
        if recorded is not None:
            log.warning(
                "extract: %s was pretrained on tiles normalised with %s; --stain_norm none "
                "extracts raw tiles, which it did not see in pretraining",
                encoder.name,
                recorded.get("source") or recorded["method"],
            )
        return None, "", ""
    body = normalizer_body(value)
    if recorded is not None and body_sha256(body) != recorded.get("sha256"):
        log.warning(
            "extract: %s was pretrained on tiles normalised with %s; --stain_norm %s is "
            "another normalizer (leave --stain_norm unset to apply the encoder's own)",
            encoder.name,
            recorded.get("source") or recorded["method"],
            text,
        )
    # a file keeps its file digest (feature files of earlier runs stay complete)
    digest = body_sha256(body) if preset_name(value) else sha256_file(value)
    return body, text, digest


def plan(
    cfg: ExtractConfig,
    encoder: Encoder,
    weights_sha: str,
    out: Path,
    stain: tuple[str, str] | None = None,
) -> tuple[list[Job], list[dict]]:
    """Jobs of this shard, and manifest rows of the slides already done or failed here.
    ``stain``: the stain normalizer's name and digest (:func:`choose_stain_norm`)."""
    files = list_coords_files(cfg.coords)
    index, count = parse_shard(cfg.shard)
    files = sorted(files, key=lambda p: p.stem)[index::count]
    jobs, skipped = [], []
    transform = {
        "input_size": encoder.input_size,
        "mean": list(encoder.mean),
        "std": list(encoder.std),
    }
    if encoder.resize_size is not None:  # zoo encoders: the authors' resize and crop
        transform.update(
            resize_size=encoder.resize_size,
            interpolation=encoder.interpolation,
            center_crop=encoder.center_crop,
        )
    zoo = {"encoder_key": encoder.key, "output_mode": encoder.output_mode} if encoder.key else {}
    stain_name, stain_sha = (
        stain if stain is not None else choose_stain_norm(cfg.stain_norm, encoder)[1:]
    )
    moved = {e.slide_id: e.path for e in list_slides(cfg.slides)} if cfg.slides else {}
    for path in files:
        try:  # an unreadable coords file fails its slide only
            table = read_coords(path)
        except PipelineError as exc:
            log.warning("%s failed: %s", path.stem, exc)
            skipped.append(
                {
                    "slide_id": path.stem,
                    "status": "failed",
                    "n_tiles": 0,
                    "seconds": 0.0,
                    "path": "",
                    "error": str(exc),
                }
            )
            continue
        slide_id = str(table.attrs.get("slide_id") or path.stem)
        slide_path = moved.get(slide_id) or table.slide_path
        if not slide_path:
            error = (
                f"{path}: the coords do not name their slide (CLAM coords do not); pass "
                "--slides FOLDER or LIST.csv to find slides by id"
            )
            log.warning("%s failed: %s", slide_id, error)
            skipped.append(
                {
                    "slide_id": slide_id,
                    "status": "failed",
                    "n_tiles": len(table),
                    "seconds": 0.0,
                    "path": "",
                    "error": error,
                }
            )
            continue
        target = out / f"{slide_id}.h5"
        attrs = {
            "slide_id": slide_id,
            "slide_path": str(slide_path),
            "encoder": encoder.name,
            "encoder_sha256": weights_sha,
            "weights": encoder.weights,
            "pooling": cfg.pooling,
            **zoo,
            "precision": cfg.precision,
            "dtype": cfg.dtype,
            "transform": transform,
            "target_mpp": table.target_mpp if table.target_mpp is not None else -1.0,
            "patch_size": table.patch_size,
            "patch_size_level0": table.patch_size_level0,
            "coords_sha256": sha256_file(path),
            "coords_file": str(path.resolve()),
            "stain_norm": stain_name,
            "stain_norm_sha256": stain_sha,
        }
        if not cfg.overwrite and is_complete(target, attrs):
            skipped.append(
                {
                    "slide_id": slide_id,
                    "status": "skipped",
                    "n_tiles": len(table),
                    "seconds": 0.0,
                    "path": str(target),
                    "error": "",
                }
            )
            continue
        remove_temporaries(target)  # this shard owns the slide: leftovers are a killed run's
        jobs.append(Job(slide_id, path, table, target, attrs, Path(slide_path)))
    return jobs, skipped


def extract(cfg: ExtractConfig) -> list[dict]:
    """Extract features of this shard's slides; returns the manifest rows."""
    if cfg.coords is None:
        raise ConfigError(
            "extract needs --coords OUT/coords (the coords folder of `cpath preprocess`)"
        )
    if not cfg.encoder:
        raise ConfigError(
            "extract needs --encoder: an exported folder (`cpath pretrain`), timm:<arch> with "
            "--encoder_weights FILE, hf-hub:<org>/<name>, or a zoo model KEY[:MODE] "
            "(`cpath encoders`) with --encoder_weights FILE. For a random-init baseline say so: "
            "timm:<arch> without weights, or random:<exported folder>."
        )
    if cfg.batch_size < 1:
        raise ConfigError("--batch_size must be at least 1")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # random-init encoders are reproducible
    encoder = load_encoder(
        cfg.encoder, weights=cfg.encoder_weights, device=device, weights_map=cfg.weights_map
    )
    if encoder.output_mode is not None and cfg.pooling != "cls":
        raise ConfigError(
            f"--pooling {cfg.pooling} does not apply to {encoder.name}: choose its output mode "
            f"in the name ({encoder.key}:MODE) and leave --pooling at cls"
        )
    weights_sha = encoder.weights_sha256 or state_sha256(encoder.model)
    stain_body, stain_name, stain_sha = choose_stain_norm(cfg.stain_norm, encoder)
    stain = load_normalizer(stain_body, device=device) if stain_body else None
    out = Path(cfg.out)
    index, count = parse_shard(cfg.shard)
    # bad coords or slides: nothing written
    jobs, rows = plan(cfg, encoder, weights_sha, out, (stain_name, stain_sha))
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out, f"config{shard_suffix(index, count)}.yaml")
    dim = encoder.output_dim(cfg.pooling)
    log.info(
        "extract: %d slides to do, %d done before (shard %d/%d), %s on %s -> %s",
        len(jobs),
        len(rows),
        index,
        count,
        encoder.name,
        device,
        out,
    )

    for job in [j for j in jobs if len(j.table) == 0]:  # empty slides: valid files with N = 0
        FeatureWriter(
            job.out,
            0,
            dim,
            job.table.coords,
            job.attrs,
            cfg.dtype,
            coords_attrs=feature_coords_attrs(job.table),
        ).close()
        rows.append(_row(job, "done", 0.0))
    jobs = [j for j in jobs if len(j.table)]
    dataset = SlideBatches(jobs, cfg.batch_size)
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.workers > 0 else None,
    )
    autocast = torch.autocast(
        device.type,
        dtype=AUTOCAST.get(cfg.precision, torch.float32),
        enabled=cfg.precision in AUTOCAST,
    )
    total = sum(len(j.table) for j in jobs)
    bar = tqdm(total=total, unit="tile", desc="extract", disable=not cfg.progress, smoothing=0.1)
    writers: dict[int, FeatureWriter] = {}
    started: dict[int, float] = {}
    clock: float | None = None  # end of the previous slide (or arrival of the first batch)
    failed: dict[int, str] = {}
    try:
        for item in loader:
            clock = time.perf_counter() if clock is None else clock
            j = item["job"]
            job = jobs[j]
            if j in failed:
                bar.update(item["n"])
                continue
            if item["error"] is not None:
                failed[j] = item["error"]
                if j in writers:
                    writers.pop(j).abort()
                log.warning("%s failed: %s", job.slide_id, item["error"])
                rows.append(_row(job, "failed", 0.0, item["error"]))
                bar.update(item["n"])
                continue
            images = item["images"].to(device, non_blocking=True)  # b x 3 x H x W uint8
            with torch.inference_mode(), autocast:
                if stain is not None:
                    images = stain(images)
                feats = encoder.embed(images, cfg.pooling).float()  # b x D
            if j not in writers:
                started[j] = clock
                writers[j] = FeatureWriter(
                    job.out,
                    len(job.table),
                    dim,
                    job.table.coords,
                    job.attrs,
                    cfg.dtype,
                    coords_attrs=feature_coords_attrs(job.table),
                )
            writer = writers[j]
            bar.update(len(feats))
            try:  # non-finite features, or features float16 cannot hold: this slide fails
                writer.write(feats.cpu().numpy(), item["start"])
            except PipelineError as exc:
                failed[j] = str(exc)
                writers.pop(j).abort()
                log.warning("%s failed: %s", job.slide_id, exc)
                rows.append(_row(job, "failed", 0.0, str(exc)))
                continue
            if writer.written == writer.n_tiles:
                writers.pop(j).close()
                clock = time.perf_counter()
                rows.append(_row(job, "done", clock - started[j]))
                bar.set_postfix(done=len(rows) - len(failed), failed=len(failed))
    finally:
        for writer in writers.values():  # interrupted: no partial file under a final name
            writer.abort()
        bar.close()
    write_manifest(out / f"manifest{shard_suffix(index, count)}.csv", rows, MANIFEST_FIELDS)
    return rows


def feature_coords_attrs(table: Coords) -> dict:
    """Attributes of a feature file's ``coords`` dataset: the coords file's, with the names
    CLAM and TRIDENT read (slide encoders that read TRIDENT's feature files find them)."""
    return {**{k: v for k, v in table.attrs.items() if v is not None}, **reader_attrs(table.attrs)}


def _row(job: Job, status: str, seconds: float, error: str = "") -> dict:
    return {
        "slide_id": job.slide_id,
        "status": status,
        "n_tiles": len(job.table),
        "seconds": round(seconds, 3),
        "path": str(job.out),
        "error": error,
    }
