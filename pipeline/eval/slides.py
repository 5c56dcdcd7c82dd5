"""Slide-level tasks of a benchmark suite: MIL cross-validation per encoder, over seeds.

Every encoder of a task is trained on the same splits (one ``splits_seed<s>.csv`` per
seed, grouped by patient, made again when the labels or split settings change), with
:func:`pipeline.mil.training.train_cv`; finished folds are reused on a rerun with the
same labels, features, splits and training settings. Per encoder, the out-of-fold
predictions of the seeds are averaged per slide, and the metrics, their bootstrap CI and
the paired comparisons are computed on those averages, resampling patients (all slides of
one together).

A labels CSV with a ``split`` column (``train``, ``val`` or ``test`` per slide) gives a
fixed split instead: every seed trains one model on the ``train`` slides (``val`` ones
for early stopping) and predicts the ``test`` slides, which are then the task's items.
With ``tile_labels`` (a CSV ``slide_id,index,positive``), every run also scores its fold
models' attention against the tile labels of its test slides (the localization AUC).

With ``transfer`` (``{encoder: pretrained model.ckpt}``, see
:mod:`pipeline.mil.transfer`), each of those encoders also gets a transferred arm,
``<encoder> (transferred)``: the same splits, seeds and settings, every fold's model
started from the pretrained aggregator's body, scored and compared beside training from
scratch. With ``mil: {shots: k}`` (or ``train_fraction``) both arms train on the same
few-shot subsets.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from pipeline.mil.metrics import classification_metric, classification_metrics, concordance_index
from pipeline.mil.splits import make_splits, read_splits, write_splits
from pipeline.mil.train import TrainMILConfig
from pipeline.mil.training import read_labels, train_cv

log = logging.getLogger(__name__)


def feature_folders(template: str, encoders: list[str]) -> dict[str, Path]:
    """``{encoder: folder}`` from a ``features`` path with ``{encoder}`` in it."""
    if len(encoders) > 1 and "{encoder}" not in template:
        raise PipelineError(
            f"features '{template}' must contain {{encoder}} to tell the encoders' "
            "feature folders apart"
        )
    folders = {e: Path(template.format(encoder=e)) for e in encoders}
    for e, folder in folders.items():
        if not folder.is_dir() or not any(folder.glob("*.h5")):
            raise PipelineError(
                f"{folder}: no feature files for encoder '{e}'; run "
                f"`cpath extract --encoder ... --out {folder}` first"
            )
    return folders


def _tile_set(path: Path) -> tuple[int, str]:
    with h5py.File(path, "r") as f:
        return int(f["coords"].shape[0]), str(f.attrs.get("coords_sha256", ""))


def check_same_tiles(folders: dict[str, Path], slide_ids: list[str]) -> list[str]:
    """The labelled slides every encoder has features for; an error when the encoders
    cover different slides or different tiles of a slide (compare like with like)."""
    have = {e: {p.stem for p in f.glob("*.h5")} & set(slide_ids) for e, f in folders.items()}
    first, common = next(iter(have)), set.intersection(*have.values())
    for e, ids in have.items():
        if ids != have[first]:
            differ = sorted(ids ^ have[first])[:5]
            raise PipelineError(
                f"encoders '{first}' and '{e}' have features for different slides "
                f"({', '.join(differ)}); extract the same slides for every encoder"
            )
    for slide in sorted(common):
        sets = {e: _tile_set(folders[e] / f"{slide}.h5") for e in folders}
        if len({n for n, _ in sets.values()}) > 1 or len({h for _, h in sets.values() if h}) > 1:
            raise PipelineError(
                f"slide {slide}: the encoders' feature files hold different tile sets "
                f"({ {e: n for e, (n, _) in sets.items()} } tiles); extract every encoder "
                "from the same coords"
            )
    if not common:
        raise PipelineError("no labelled slide has features")
    return [s for s in slide_ids if s in common]


def run_slide_task(task: dict, encoders: list[str], out: Path, progress: bool = False) -> dict:
    """Train and score every encoder on one slide task; returns per-encoder results."""
    kind = task.get("task", "classification")
    labels = Path(task["labels"]) if task.get("labels") else None
    if labels is None or not labels.is_file():
        raise PipelineError(f"labels file '{labels}' not found")
    given = task.get("tile_labels") or task.get("mil", {}).get("tile_labels")
    tile_labels = Path(given) if given else None
    if tile_labels is not None and not tile_labels.is_file():
        raise PipelineError(f"tile_labels file '{tile_labels}' not found")
    folders = feature_folders(str(task["features"]), encoders)
    rows = read_labels(labels, kind)
    fixed = fixed_split(rows, labels)  # None: cross-validation
    slides = check_same_tiles(folders, [r["slide_id"] for r in rows])
    rows = [r for r in rows if r["slide_id"] in set(slides)]
    if kind == "classification" and len({r["label"] for r in rows}) < 2:
        raise PipelineError(f"{labels}: one class among the slides with features")
    seeds = list(task.get("seeds", [0]))
    folds = int(task.get("folds", 5))
    if fixed is not None:
        fixed = [r for r in fixed if r["slide_id"] in set(slides)]
        for role in ("train", "test"):
            if not any(r["fold_0"] == role for r in fixed):
                raise PipelineError(
                    f"{labels}: the split column has no {role} rows among the slides with "
                    "features; a fixed split needs train and test slides"
                )
        if "folds" in task:
            log.warning(
                "%s has a split column: its fixed split is used, not folds %d", labels, folds
            )
        log.info(
            "%s: fixed split, %s slides",
            labels,
            ", ".join(f"{sum(r['fold_0'] == k for r in fixed)} {k}" for k in SPLIT_ROLES),
        )
        folds = 1
    out.mkdir(parents=True, exist_ok=True)
    kept = out / "labels.csv"  # the slides every encoder has, for train_cv
    fields = list(rows[0])
    with atomic_path(kept) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    stratify = "label" if kind == "classification" else "event"
    for s in seeds:
        if fixed is not None:  # the same split for every seed: only the training varies
            splits = fixed
        else:
            splits = make_splits(
                rows, folds, float(task.get("val_share", 0.2)), s, stratify=stratify
            )
        current_splits(out / f"splits_seed{s}.csv", splits)
    roles = [r["fold_0"] for r in fixed] if fixed is not None else []
    split = {
        "split": "cv" if fixed is None else "fixed",
        # cross-validation: every slide trains the models of the folds that do not test it
        "n_train": roles.count("train") if fixed is not None else len(rows),
        "n_val": roles.count("val") if fixed is not None else None,  # cv: val_share
        "folds": folds,
    }
    transfer = dict(task.get("transfer") or {})
    unknown = sorted(set(transfer) - set(encoders))
    if unknown:
        raise PipelineError(
            f"transfer names encoders the suite does not evaluate: {', '.join(unknown)}"
        )
    # (name in the results, encoder, run folder, pretrained model or None)
    arms = [(e, e, e, None) for e in encoders]
    arms += [(f"{e} (transferred)", e, f"{e}+transfer", transfer[e]) for e in transfer]
    results = {}
    for name, e, folder, init_from in arms:
        runs, located = [], []
        for s in seeds:
            cfg = TrainMILConfig(
                **{
                    **task.get("mil", {}),
                    "features": folders[e],
                    "labels": kept,
                    "model": task.get("model", "abmil"),
                    "task": kind,
                    "folds": folds,
                    "seed": s,
                    "splits": out / f"splits_seed{s}.csv",
                    "out": out / folder / f"seed_{s}",
                    "tile_labels": tile_labels,
                    "bootstrap": 0,  # the suite computes its own intervals
                    "progress": progress,
                    "init_from": init_from,
                }
            )
            metrics = train_cv(cfg)
            with open(cfg.out / "predictions.csv", newline="") as f:
                runs.append(list(csv.DictReader(f)))
            if tile_labels is not None:
                located.append(dict(metrics.get("localization", {}).get("per_slide", {})))
        results[name] = {
            **seed_average(runs, kind),
            **split,
            "localization": located if tile_labels is not None else None,
        }
    return results


SPLIT_ROLES = ("train", "val", "test")


def fixed_split(rows: list[dict], labels: Path) -> list[dict] | None:
    """The splits (one fold, ``fold_0``: train, val or test) of a labels CSV with a
    ``split`` column, in the layout of :func:`pipeline.mil.splits.write_splits`; ``None``
    without one. An error for another value (naming the row), or for a patient with slides
    on both sides (training or validation, and test)."""
    if not rows or "split" not in rows[0]:
        return None
    splits, sides = [], {}
    for line, r in enumerate(rows, start=2):  # line 1: the header
        role = (r.get("split") or "").strip().lower()
        if role not in SPLIT_ROLES:
            raise PipelineError(
                f"{labels}, line {line} (slide {r['slide_id']}): split must be train, val "
                f"or test, not '{r.get('split') or ''}'"
            )
        sides.setdefault(r["case_id"], {})[role == "test"] = r["slide_id"]
        splits.append(
            {
                "slide_id": r["slide_id"],
                "case_id": r["case_id"],
                "label": str(r["label"]),
                "fold_0": role,
            }
        )
    for case, side in sides.items():
        if len(side) > 1:
            raise PipelineError(
                f"{labels}: patient {case} has slides on both sides of the split "
                f"({side[False]} trains, {side[True]} tests); put all of a patient's "
                "slides in train/val or all in test"
            )
    return splits


def current_splits(path: Path, splits: list[dict]) -> Path:
    """Write ``splits`` to ``path`` unless it holds them already (its time stamp then stays);
    splits of other slides, patients, labels or settings are replaced, with a warning."""
    fields = ["slide_id", "case_id", "label", *(k for k in splits[0] if k.startswith("fold_"))]
    wanted = [{k: str(r[k]) for k in fields} for r in splits]
    if path.is_file():
        try:
            if read_splits(path) == wanted:
                return path
        except PipelineError:
            pass
        log.warning("%s: made again for the current labels and settings", path)
    return write_splits(path, splits)


def seed_average(runs: list[list[dict]], kind: str) -> dict:
    """Per-slide mean of the seeds' out-of-fold predictions, their metrics, and each slide's
    patient (``groups``: the clusters of the bootstrap)."""
    ids = sorted(r["slide_id"] for r in runs[0])
    by_run = [{r["slide_id"]: r for r in run} for run in runs]
    first = by_run[0]
    patients = np.array([first[s]["case_id"] for s in ids])  # the clusters of the bootstrap
    if kind == "classification":
        classes = [k[5:] for k in runs[0][0] if k.startswith("prob_")]
        y = np.array([classes.index(first[s]["label"]) for s in ids])
        preds = np.mean(
            [[[float(run[s][f"prob_{c}"]) for c in classes] for s in ids] for run in by_run], 0
        )
        per_seed = [
            classification_metrics(
                y, np.array([[float(run[s][f"prob_{c}"]) for c in classes] for s in ids])
            )
            for run in by_run
        ]
        return {
            "kind": kind,
            "slide_ids": ids,
            "y": y,
            "preds": preds,
            "classes": classes,
            "per_seed": per_seed,
            "groups": patients,
        }
    time = np.array([float(first[s]["time"]) for s in ids])
    event = np.array([float(first[s]["event"]) for s in ids])
    risk = np.mean([[float(run[s]["risk"]) for s in ids] for run in by_run], 0)
    per_seed = [
        {"c_index": concordance_index(time, event, np.array([float(run[s]["risk"]) for s in ids]))}
        for run in by_run
    ]
    return {
        "kind": kind,
        "slide_ids": ids,
        "y": np.stack([time, event], 1),
        "preds": risk,
        "per_seed": per_seed,
        "groups": patients,
    }


def slide_metric(kind: str, name: str):
    """``metric(idx, preds)`` over items ``idx`` (for bootstrap and paired tests)."""

    def metric(y, idx, preds) -> float:
        if kind == "classification":
            return classification_metric(name, y[idx], preds[idx])
        return concordance_index(y[idx, 0], y[idx, 1], preds[idx])

    return metric
