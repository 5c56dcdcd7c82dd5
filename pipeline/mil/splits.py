"""Cross-validation splits for slide-level tasks: stratified by label, grouped by patient.

``make_splits`` assigns every slide, for each fold ``k``, the role ``train``, ``val`` or
``test``: the test folds partition the slides (StratifiedGroupKFold: no ``case_id`` in two
folds), and a validation share is taken from each fold's training slides, again by
patient. Slides of a fixed test set are ``test`` in every fold. Splits are written to
``RUN/splits.csv`` (``slide_id, case_id, label, fold_0 ... fold_{k-1}``) and read back so
that other runs (another encoder, another model) use exactly the same ones.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.errors import PipelineError
from pipeline.io import atomic_path


def make_splits(
    slides: list[dict],
    folds: int = 5,
    val_share: float = 0.2,
    seed: int = 0,
    test_slides: set[str] | None = None,
    stratify: str = "label",
) -> list[dict]:
    """Rows ``{slide_id, case_id, label, fold_0: role, ...}`` (see module docstring)."""
    test_slides = set(test_slides or ())
    rows = [dict(r) for r in slides]
    cv = [r for r in rows if r["slide_id"] not in test_slides]
    cases = {r["case_id"] for r in cv}
    if len(cases) < folds:
        raise PipelineError(f"{folds} folds need at least {folds} patients; there are {len(cases)}")
    y = np.array([str(r[stratify]) for r in cv])
    groups = np.array([r["case_id"] for r in cv])
    outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for r in rows:
        for k in range(folds):
            r[f"fold_{k}"] = "test" if r["slide_id"] in test_slides else "train"
    for k, (train_idx, test_idx) in enumerate(outer.split(np.zeros(len(cv)), y, groups)):
        for i in test_idx:
            cv[i][f"fold_{k}"] = "test"
        n_val = max(2, round(1 / val_share)) if val_share > 0 else 0
        if n_val and len(set(groups[train_idx])) >= n_val:
            inner = StratifiedGroupKFold(n_splits=n_val, shuffle=True, random_state=seed + k + 1)
            _, val_idx = next(
                inner.split(np.zeros(len(train_idx)), y[train_idx], groups[train_idx])
            )
            for i in train_idx[val_idx]:
                cv[i][f"fold_{k}"] = "val"
    return rows


def write_splits(path: str | os.PathLike, rows: list[dict]) -> Path:
    folds = sorted((k for k in rows[0] if k.startswith("fold_")), key=lambda k: int(k[5:]))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=["slide_id", "case_id", "label", *folds], extrasaction="ignore"
        )
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def read_splits(path: str | os.PathLike) -> list[dict]:
    """Splits written by :func:`write_splits` (or by hand in the same layout)."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read the splits ({exc})") from exc
    if not rows or not any(k.startswith("fold_") for k in rows[0]):
        raise PipelineError(
            f"{path}: no fold_<k> columns; expected slide_id,case_id,label,fold_0,..."
        )
    bad = {v for r in rows for k, v in r.items() if k.startswith("fold_")} - {
        "train",
        "val",
        "test",
    }
    if bad:
        raise PipelineError(f"{path}: roles must be train, val or test, not {sorted(bad)}")
    return rows


def splits_mismatch(
    splits: list[dict], slides: list[dict], folds: int | None = None, exact: bool = True
) -> str | None:
    """Why ``splits`` (from :func:`read_splits`) do not fit the labelled ``slides`` (rows with
    ``slide_id, case_id, label``), or ``None`` when they fit: a labelled slide missing from
    them, a patient tested in a fold where another of its slides trains, another ``case_id``
    of a slide, another fold count (``folds``: when given). With ``exact``, also slides that
    are not labelled and another ``label`` of a slide (splits made for other labels)."""
    have = {r["slide_id"]: r for r in splits}
    want = {r["slide_id"]: r for r in slides}
    new = sorted(set(want) - set(have))
    gone = sorted(set(have) - set(want)) if exact else []
    if new:
        return f"{len(new)} labelled slides are not in them ({', '.join(new[:3])})"
    if gone:
        return f"{len(gone)} of their slides are not labelled now ({', '.join(gone[:3])})"
    fold_keys = [k for k in splits[0] if k.startswith("fold_")]
    for key in fold_keys:
        tested: dict[str, set[bool]] = {}
        for s, r in want.items():
            tested.setdefault(r["case_id"], set()).add(have[s][key] == "test")
        split = sorted(c for c, roles in tested.items() if len(roles) > 1)
        if split:
            return f"patients {', '.join(split[:3])} have slides on both sides of {key}"
    for key in ("case_id", "label") if exact else ("case_id",):
        if key in splits[0]:
            moved = sorted(s for s in want if str(want[s][key]) != have[s][key])
            if moved:
                return f"{len(moved)} slides have another {key} now ({', '.join(moved[:3])})"
    if folds is not None and len(fold_keys) != folds:
        return f"they have {len(fold_keys)} folds, not {folds}"
    return None


def fold_members(rows: list[dict], fold: int, role: str) -> list[str]:
    """Slide ids with ``role`` in ``fold``."""
    return [r["slide_id"] for r in rows if r[f"fold_{fold}"] == role]
