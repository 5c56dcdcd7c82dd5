"""Crash-safe file output: every result is written under a temporary name and renamed.

A killed run therefore never leaves a half-written file under a final name, and
reruns can trust that any file present under its final name is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path


def temporary_path(path: Path) -> Path:
    """A sibling temporary name for ``path`` (same folder, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write to; rename it to ``path`` only on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the final path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_suffix(index: int, count: int) -> str:
    """``""`` for a single process, else ``".shard-<i>-of-<n>"`` (per-shard output names)."""
    return "" if count == 1 else f".shard-{index}-of-{count}"


def write_manifest(path: str | os.PathLike, rows: list[dict], fields: list[str]) -> Path:
    """Per-slide status rows as CSV, sorted by ``slide_id``, written atomically."""
    import csv

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: r["slide_id"]))
    return Path(path)


def remove_temporaries(path: str | os.PathLike) -> int:
    """Delete temporary files of ``path`` (``.<name>.<pid>.tmp``) left by killed runs. Call it
    only from the one process that owns ``path``. Returns the number removed."""
    path = Path(path)
    stale = list(path.parent.glob(f".{path.name}.*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return len(stale)


def read_slide_column(path: str | os.PathLike, column: str, what: str) -> dict[str, str]:
    """``{slide_id: value}`` from a CSV with the columns ``slide_id`` and ``column`` (cells
    stripped, empty values left out); ``what`` names the table in errors (ConfigError: the
    file cannot be read or lacks the columns)."""
    import csv

    from pipeline.errors import ConfigError

    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what} ({exc})") from exc
    if not rows or not {"slide_id", column} <= set(rows[0]):
        raise ConfigError(f"{path}: the {what} needs the columns slide_id,{column}, a row a slide")
    return {
        r["slide_id"].strip(): r[column].strip()
        for r in rows
        if r["slide_id"] and r[column] and r[column].strip()
    }
