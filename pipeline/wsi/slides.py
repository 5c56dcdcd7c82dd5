"""Which slides a run works on: a folder, a glob or a CSV list, split into shards."""

from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError

SLIDE_SUFFIXES = {
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".svslide",
    ".dcm", ".png", ".jpg", ".jpeg",
}  # fmt: skip


@dataclass(frozen=True)
class SlideEntry:
    """One slide to process: its id (output file stem), path and optional mpp override."""

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
        mpp_text = row.get("mpp") or row.get("level0_mpp") or ""
        try:
            mpp = float(mpp_text) if mpp_text.strip() else None
        except ValueError:
            raise ConfigError(f"{path}, line {i}: mpp '{mpp_text}' is not a number.") from None
        entries.append(SlideEntry(row.get("slide_id") or slide.stem, slide, mpp))
    return entries


def list_slides(spec: str | os.PathLike, level0_mpp: float | None = None) -> list[SlideEntry]:
    """Slides named by ``spec``: a folder (searched recursively), a glob, a CSV or one file.

    A CSV has a ``path`` column (relative paths are relative to the CSV) and optional
    ``slide_id`` and ``mpp`` columns. ``level0_mpp`` is the fallback resolution of
    slides whose metadata has none (a CSV ``mpp`` wins over it). Ordered by slide id.
    """
    text = str(spec)
    if not text:
        raise ConfigError("no slides given: pass --slides DIR, a glob ('dir/*.svs') or LIST.csv")
    path = Path(text).expanduser()
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.suffix.lower() in SLIDE_SUFFIXES and p.is_file()]
        entries = [SlideEntry(p.stem, p) for p in files]
    elif path.suffix.lower() == ".csv" and path.is_file():
        entries = _from_csv(path)
    elif path.is_file():
        entries = [SlideEntry(path.stem, path)]
    else:
        entries = [SlideEntry(Path(p).stem, Path(p)) for p in glob.glob(text, recursive=True)]
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


def parse_shard(shard: str | None, env: os._Environ | dict | None = None) -> tuple[int, int]:
    """``(index, count)`` of this process's shard.

    From ``shard`` ("i/n", 0-based) when given, else from a SLURM job array
    (``SLURM_ARRAY_TASK_ID``, ``SLURM_ARRAY_TASK_COUNT``, ``SLURM_ARRAY_TASK_MIN``), else
    from torchrun (``RANK``, ``WORLD_SIZE``), else from ``srun`` tasks (``SLURM_PROCID``,
    ``SLURM_NTASKS``), else ``(0, 1)``.
    """
    env = os.environ if env is None else env
    if shard:
        try:
            index, count = (int(v) for v in str(shard).split("/"))
        except ValueError:
            raise ConfigError(f"--shard '{shard}' is not of the form i/n (e.g. 0/4)") from None
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        count = int(env["SLURM_ARRAY_TASK_COUNT"])
    elif "RANK" in env and "WORLD_SIZE" in env:
        index, count = int(env["RANK"]), int(env["WORLD_SIZE"])
    elif int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:  # srun, one task per GPU
        index, count = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    else:
        index, count = 0, 1
    if not 0 <= index < count:
        raise ConfigError(f"shard {index}/{count} is out of range: need 0 <= i < n")
    return index, count


def shard_slides(entries: list[SlideEntry], index: int, count: int) -> list[SlideEntry]:
    """Deterministic split: every ``count``-th slide by id, starting at ``index``."""
    return sorted(entries, key=lambda e: e.slide_id)[index::count]
