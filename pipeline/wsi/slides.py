"""Which slides a run works on: a folder, a glob or a CSV list, split into shards."""

from __future__ import annotations

import csv
import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.wsi.reader import MPP_RANGE

SLIDE_SUFFIXES = {
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".bif",
    ".svslide",
    ".dcm",
    ".png",
    ".jpg",
    ".jpeg",
}
LABEL_SUFFIXES = {".png", ".jpg", ".jpeg"}
NOT_SLIDE_NAMES = ("label", "macro", "overview", "thumbnail")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideEntry:
    """One slide to process: its id (output file stem), path and optional level-0 mpp,
    which overrides the slide's metadata."""

    slide_id: str
    path: Path
    level0_mpp: float | None = None


def _from_csv(path: Path) -> list[SlideEntry]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ConfigError(f"{path}: the slide list is empty.")
    column = next((c for c in ("path", "slide_path", "filename") if c in rows[0]), None)
    if column is None:
        raise ConfigError(
            f"{path}: the slide list needs a 'path' column (found: {', '.join(rows[0])})."
        )
    entries = []
    for i, row in enumerate(rows, start=2):
        if not row[column]:
            raise ConfigError(f"{path}, line {i}: empty '{column}'.")
        slide = Path(row[column]).expanduser()
        slide = slide if slide.is_absolute() else path.parent / slide
        series = sorted(slide.glob("*.dcm")) if slide.is_dir() else []
        slide = series[0] if series else slide  # a DICOM folder: as a folder scan lists it
        mpp_text = row.get("mpp") or row.get("level0_mpp") or ""
        try:
            mpp = float(mpp_text) if mpp_text.strip() else None
        except ValueError:
            raise ConfigError(f"{path}, line {i}: mpp '{mpp_text}' is not a number.") from None
        if mpp is not None and not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
            raise ConfigError(
                f"{path}, line {i}: mpp {mpp_text} is not a level-0 resolution in um per px "
                f"({MPP_RANGE[0]}-{MPP_RANGE[1]}; 0.25 is typical of 40x, 0.5 of 20x)."
            )
        entries.append(SlideEntry(row.get("slide_id") or _slide_id(slide), slide, mpp))
    return entries


def _slide_id(path: Path) -> str:
    """Default id: the file stem; for a DICOM file, its folder (one folder is one slide)."""
    return path.parent.name if path.suffix.lower() == ".dcm" else path.stem


def _is_label_image(path: Path) -> bool:
    """A scanner's label, macro or overview picture saved beside the slides, not a slide."""
    stem = path.stem.lower()
    return path.suffix.lower() in LABEL_SUFFIXES and (
        stem in NOT_SLIDE_NAMES or any(stem.endswith(s + n) for s in "_-" for n in NOT_SLIDE_NAMES)
    )


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder`` (a symlinked slide counts where its link is)."""
    if path.absolute().is_relative_to(folder.absolute()):
        return True
    return path.parent.resolve().is_relative_to(folder.resolve())


def _scanned(files: list[Path], exclude: Path | None) -> list[SlideEntry]:
    """Entries of the files a folder scan or glob found: one per DICOM folder, no label
    pictures, nothing under ``exclude`` (the run's output folder)."""
    if exclude is not None:
        files = [p for p in files if not _inside(p, Path(exclude).expanduser())]
    skipped = {p for p in files if _is_label_image(p)}
    if skipped:
        log.info("skipped %d label/macro pictures (e.g. %s)", len(skipped), min(skipped))
    dicom: dict[Path, Path] = {}
    entries = []
    for p in sorted(files):
        if p in skipped:
            continue
        if p.suffix.lower() == ".dcm":  # OpenSlide opens the series from any of its files
            dicom.setdefault(p.parent, p)
        else:
            entries.append(SlideEntry(p.stem, p))
    return entries + [SlideEntry(_slide_id(p), p) for p in dicom.values()]


def list_slides(
    spec: str | os.PathLike, level0_mpp: float | None = None, exclude: Path | None = None
) -> list[SlideEntry]:
    """Slides named by ``spec``: a folder (searched recursively), a glob, a CSV or one file.

    A CSV has a ``path`` column (relative paths are relative to the CSV) and optional
    ``slide_id`` and ``mpp`` columns. A given level-0 mpp (``level0_mpp`` for every
    slide, or a CSV ``mpp``, which wins over it) overrides the slide's metadata. A
    folder of DICOM files is one slide named after the folder. Folder scans and globs
    skip ``exclude`` (the output folder, when it lies inside the slides folder) and
    label/macro pictures (``label.jpg``, ``<id>_macro.png``, ...). Ordered by slide id.
    """
    text = str(spec)
    if not text:
        raise ConfigError("no slides given: pass --slides DIR, a glob ('dir/*.svs') or LIST.csv")
    path = Path(text).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file()]
        entries = _scanned(files, exclude)
    elif path.suffix.lower() == ".csv" and path.is_file():
        entries = _from_csv(path)
    elif path.is_file():
        entries = [SlideEntry(_slide_id(path), path)]
    else:
        entries = _scanned([Path(p) for p in glob.glob(text, recursive=True)], exclude)
    if not entries:
        raise ConfigError(f"no slides found at '{text}': check the folder, glob or CSV.")
    entries = [
        SlideEntry(e.slide_id, e.path, e.level0_mpp if e.level0_mpp is not None else level0_mpp)
        for e in entries
    ]
    seen: dict[str, Path] = {}
    for e in entries:
        if e.slide_id in seen:
            raise ConfigError(
                f"two slides share the id '{e.slide_id}': {seen[e.slide_id]} and {e.path}. "
                "Give unique ids in a CSV with a 'slide_id' column."
            )
        seen[e.slide_id] = e.path
    return sorted(entries, key=lambda e: e.slide_id)


def _launcher_rank(env) -> tuple[int, int, str] | None:
    """``(rank, world, how)`` of this process within its job, from torchrun or srun."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), "torchrun RANK/WORLD_SIZE"
    # Only srun steps carry SLURM_STEP_*; the batch script of `sbatch -n 8` has SLURM_NTASKS=8
    # and SLURM_PROCID=0 too, but is one process that must do every slide.
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), "srun task"
    return None


def parse_shard(shard: str | None, env: os._Environ | dict | None = None) -> tuple[int, int]:
    """``(index, count)`` of this process's shard.

    From ``shard`` ("i/n", 0-based) when given. Else from the environment: a SLURM job
    array task (``SLURM_ARRAY_TASK_ID`` - ``SLURM_ARRAY_TASK_MIN``, of
    ``SLURM_ARRAY_TASK_COUNT``) and a process rank within it, from torchrun (``RANK``,
    ``WORLD_SIZE``) or an ``srun`` step (``SLURM_PROCID`` of ``SLURM_STEP_NUM_TASKS``; a
    batch script is not a step), combined as ``task * world + rank`` of ``tasks * world``.
    Else ``(0, 1)``.
    """
    env = os.environ if env is None else env
    if shard:
        try:
            index, count = (int(v) for v in str(shard).split("/"))
        except ValueError:
            raise ConfigError(f"--shard '{shard}' is not of the form i/n (e.g. 0/4)") from None
        how = "--shard"
    else:
        index, count, parts = 0, 1, []
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            step = int(env.get("SLURM_ARRAY_TASK_STEP", 1)) or 1
            index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            index, count = index // step, int(env["SLURM_ARRAY_TASK_COUNT"])
            parts.append(f"SLURM array task {index} of {count}")
        launcher = _launcher_rank(env)
        if launcher is not None:
            rank, world, name = launcher
            index, count = index * world + rank, count * world
            parts.append(f"{name} {rank} of {world}")
        how = " x ".join(parts) or "no --shard, SLURM array, torchrun or srun step"
    if not 0 <= index < count:
        raise ConfigError(f"shard {index}/{count} ({how}) is out of range: need 0 <= i < n")
    (log.info if count > 1 else log.debug)("shard %d of %d (0-based) from %s", index, count, how)
    return index, count


def shard_slides(entries: list[SlideEntry], index: int, count: int) -> list[SlideEntry]:
    """Deterministic split: every ``count``-th slide by id, starting at ``index``."""
    return sorted(entries, key=lambda e: e.slide_id)[index::count]
