"""The work behind ``cpath evaluate`` (see :mod:`pipeline.eval.evaluate`): each task of a
suite for every encoder, statistics, then the leaderboard and report."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import traceback
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from pipeline.config import save_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.eval.evaluate import EvaluateConfig, selected_encoders
from pipeline.eval.protocols import Folds, cross_validate, few_shot
from pipeline.eval.robustness import leakage_probe, robustness_index, slide_knn_entry
from pipeline.eval.slides import run_slide_task, slide_metric
from pipeline.eval.stats import bootstrap_ci, paired_bootstrap
from pipeline.eval.tiles import STAIN_SHIFT, TileSet, cached_features, embed_tiles, read_tile_set
from pipeline.io import atomic_path, atomic_write_text
from pipeline.mil.metrics import classification_metric, classification_metrics

log = logging.getLogger(__name__)
TILE_METRIC = "balanced_accuracy"  # the leaderboard metric of tile protocols
# version of the scoring in cached task results: 2 = cluster bootstrap (slides, patients);
# 3 = tile folds by patient, site probe on held-out slides, PathoROB robustness index;
# 4 = slide tasks: fixed train/test split from the labels, attention localization column
RESULT_VERSION = 4


def _scored(
    y: np.ndarray, probs: np.ndarray, metric: str, cfg: EvaluateConfig, groups: np.ndarray
) -> dict:
    """The metric with its cluster-bootstrap CI (``groups``: each item's patient or slide)."""
    ci = bootstrap_ci(
        lambda a, p: classification_metric(metric, a, p),
        y,
        probs,
        n=cfg.bootstrap,
        seed=cfg.seed,
        groups=groups,
    )
    return {
        "value": classification_metric(metric, y, probs),
        "ci": list(ci),
        "metrics": classification_metrics(y, probs),
    }


def _compare(
    preds: dict[str, np.ndarray], metric, cfg: EvaluateConfig, groups: np.ndarray
) -> list[dict]:
    """Paired bootstrap of every pair of encoders on the same items, resampling the
    clusters ``groups`` (each item's slide or patient)."""
    names, out = list(preds), []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            test = paired_bootstrap(
                metric, preds[a], preds[b], n=cfg.bootstrap, seed=cfg.seed, groups=groups
            )
            out.append({"a": a, "b": b, **test})
    return out


def _settings(cfg: EvaluateConfig) -> dict:
    """The settings a task's scores depend on (besides the task and its inputs)."""
    from pipeline import __version__

    keys = (
        "folds",
        "shots",
        "episodes",
        "knn_k",
        "knn_temperature",
        "robustness",
        "robustness_k",
        "bootstrap",
        "seed",
    )
    return {
        "version": __version__,
        "result_version": RESULT_VERSION,
        **{k: getattr(cfg, k) for k in keys},
    }


def _digest(*arrays: np.ndarray) -> str:
    """SHA-256 of arrays' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes() if a.dtype != object else str(a.tolist()).encode())
    return h.hexdigest()


def cached_result(path: Path, key: dict, compute) -> dict:
    """A task's result saved at ``path`` when it was computed for the same ``key`` (task,
    settings, digest of its inputs) and its figures are still there, else ``compute()``
    saved there; a rerun of an unchanged suite recomputes nothing.

    ``compute`` runs with one BLAS thread: its scikit-learn fits and bootstraps are small
    problems, which BLAS threads slow down rather than speed up (L-BFGS logistic
    regression on 1,000 x 192 features: 1.2 s with two threads, 0.07 s with one)."""
    text = json.dumps(key, sort_keys=True, default=str)
    if path.is_file():
        saved = json.loads(path.read_text())
        figures = saved.get("result", {}).get("figures", {}).values()
        if saved.get("key") == text and all(Path(f).is_file() for f in figures):
            return saved["result"]
    with threadpool_limits(1, user_api="blas"):
        result = json.loads(json.dumps(compute()))  # the same types as a reused result
    atomic_write_text(path, json.dumps({"key": text, "result": result}))
    return result


def write_folds(path: Path, tiles: TileSet, folds: Folds) -> None:
    """``folds.csv``: each tile's source, slide, patient, label and the fold that tests it
    (empty for tiles only trained on, as the training part of a fixed split)."""
    tested = np.full(len(tiles), "", dtype=object)
    for i, (_, test) in enumerate(folds):
        tested[test] = str(i)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item", "source", "row", "slide_id", "case_id", "label", "test_fold"])
        for i, (source, row) in enumerate(tiles.source):
            case = "" if tiles.patients is None else tiles.patients[i]
            w.writerow([i, source, row, tiles.groups[i], case, tiles.labels[i], tested[i]])


def tile_task(
    name: str,
    task: dict,
    encoders: dict[str, str],
    cfg: EvaluateConfig,
    out: Path,
    get_encoder,
    device,
) -> dict:
    from pipeline.extract import state_sha256

    tiles = read_tile_set(
        task.get("data"), task.get("sites"), task.get("groups"), task.get("group_pattern")
    )
    by, clusters = tiles.fold_groups()  # patient where known, else slide
    folds = Folds.make(tiles.labels, clusters, tiles.split, int(task.get("folds", cfg.folds)), by)
    write_folds(out / "tasks" / name / "folds.csv", tiles, folds)
    protocols = list(task.get("protocols", ["linear", "knn", "fewshot"]))
    classes = np.unique(tiles.labels)
    y = np.searchsorted(classes, tiles.labels)
    feats = {}
    for e, spec in encoders.items():
        encoder = get_encoder(e)
        key = {
            "spec": spec,
            "weights": state_sha256(encoder.model),
            "tiles": tiles.digest(),
            "input_size": encoder.input_size,
            "shift": STAIN_SHIFT if cfg.robustness else None,
        }
        feats[e] = cached_features(
            out / "cache" / e / f"{name}.npz",
            key,
            lambda enc=encoder: embed_tiles(
                enc, tiles, cfg.batch_size, cfg.workers, cfg.robustness, device, cfg.progress
            ),
        )
        if len(feats[e]["features"]) != len(tiles):
            raise PipelineError(
                f"encoder '{e}': {len(feats[e]['features'])} features for "
                f"{len(tiles)} tiles; delete {out / 'cache' / e} and rerun"
            )
    key = {
        "task": task,
        "encoders": encoders,
        "settings": _settings(cfg),
        "inputs": _digest(
            y,
            tiles.groups,
            clusters,
            *([] if tiles.sites is None else [tiles.sites]),
            *(a for e in encoders for a in feats[e].values()),
        ),
    }
    return cached_result(
        out / "tasks" / name / "result.json",
        key,
        lambda: _score_tiles(
            name, task, tiles, feats, folds, protocols, classes, y, encoders, cfg, out
        ),
    )


def _score_tiles(
    name, task, tiles, feats, folds, protocols, classes, y, encoders, cfg, out
) -> dict:
    from pipeline.eval import plots

    by, clusters = tiles.fold_groups()  # folds, C-sweep splits and bootstrap keep these whole
    result = {
        "kind": "tile",
        "data": str(task.get("data")),
        "n_items": len(tiles),
        "n_slides": len(np.unique(tiles.groups)),
        "grouped_by": by,
        "n_groups": len(np.unique(clusters)),
        "classes": classes.tolist(),
        "folds": len(folds.splits),
        "columns": {},
        "scores": {},
        "comparisons": {},
        "fewshot": {},
        "robustness": {},
        "figures": {},
    }
    figures = out / "figures"
    for protocol in ("linear", "knn"):
        if protocol not in protocols:
            continue
        result["columns"][protocol] = {"metric": TILE_METRIC}
        preds, scored, curves = {}, {}, {}
        for e in encoders:
            kwargs = (
                {"k": cfg.knn_k, "temperature": cfg.knn_temperature} if protocol == "knn" else {}
            )
            items, probs, _ = cross_validate(
                protocol, feats[e]["features"], tiles.labels, clusters, folds, cfg.seed, **kwargs
            )
            preds[e] = probs
            scored[e] = _scored(y[items], probs, TILE_METRIC, cfg, clusters[items])
            curves[e] = (y[items], probs)
        result["scores"][protocol] = scored
        tested = folds.test_items()  # the items of preds, in their order
        y_items = y[tested]
        result["comparisons"][protocol] = _compare(
            preds,
            lambda idx, p, y_items=y_items: classification_metric(
                TILE_METRIC, y_items[idx], p[idx]
            ),
            cfg,
            clusters[tested],
        )
        result["figures"][f"{protocol}_roc"] = plots.roc_curves(
            figures / f"{name}_{protocol}_roc.png", curves, classes, f"{name}: {protocol} probe"
        )
        result["figures"][f"{protocol}_confusion"] = plots.confusion_matrices(
            figures / f"{name}_{protocol}_confusion.png", curves, classes, f"{name}: {protocol}"
        )
    if "fewshot" in protocols:
        for e in encoders:
            x = feats[e]["features"]
            by_k: dict[int, list[float]] = {}
            for i, (train, test) in enumerate(folds):
                shots = few_shot(
                    x[train],
                    tiles.labels[train],
                    x[test],
                    tiles.labels[test],
                    tuple(cfg.shots),
                    cfg.episodes,
                    cfg.seed + i,
                )
                for k, scores in shots.items():
                    by_k.setdefault(k, []).extend(scores)
            result["fewshot"][e] = {
                int(k): {
                    "mean": float(np.mean(v)),
                    "std": float(np.std(v)),
                    "episodes": len(v),
                    "q025": float(np.percentile(v, 2.5)),
                    "q975": float(np.percentile(v, 97.5)),
                }
                for k, v in sorted(by_k.items())
            }
        common = set.intersection(*(set(v) for v in result["fewshot"].values()))
        if common:
            k = max(common)
            col = f"fewshot_{k}"
            result["columns"][col] = {"metric": TILE_METRIC}
            result["scores"][col] = {
                e: {"value": v[k]["mean"], "ci": [v[k]["q025"], v[k]["q975"]]}  # episode spread
                for e, v in result["fewshot"].items()
            }
        result["figures"]["fewshot"] = plots.fewshot_curves(
            figures / f"{name}_fewshot.png", result["fewshot"], f"{name}: few-shot (SimpleShot)"
        )
    target_name, target = "slide", tiles.groups  # what features should not encode
    known = np.ones(len(tiles), bool)
    if tiles.sites is not None and len(np.unique(tiles.sites[tiles.sites != ""])) >= 2:
        target_name, target, known = "site", tiles.sites, tiles.sites != ""
    if cfg.robustness:
        for e in encoders:
            x = feats[e]["features"]
            leak, why = None, "no site per tile: give the task a site column or a sites file"
            if target_name == "site":  # the site of held-out slides, from their features
                leak = leakage_probe(x[known], target[known], clusters[known], cfg.seed)
                why = f"needs two or more sites with tiles of two or more {by}s each"
            # PathoROB: neighbours of the same class across sites (or slides), not of the
            # same site; with sites, a tile's own slide is no candidate neighbour
            ri = robustness_index(
                x[known],
                tiles.labels[known],
                target[known],
                tiles.groups[known] if target_name == "site" else None,
                k=cfg.robustness_k,
            )
            ri_why = (
                f"no {target_name} with tiles of two classes, or no class at two {target_name}s"
            )
            entry = {
                "leakage": {"target": "site", "grouped_by": by, **(leak or {"skipped": why})},
                "robustness_index": {"confounder": target_name, **(ri or {"skipped": ri_why})},
                "slide_knn": slide_knn_entry(x, tiles.groups),
            }
            if "shifted" in feats[e]:
                items, probs, _ = cross_validate(
                    "linear",
                    feats[e]["features"],
                    tiles.labels,
                    clusters,
                    folds,
                    cfg.seed,
                    test_x=feats[e]["shifted"],
                )
                shifted = classification_metric("balanced_accuracy", y[items], probs)
                clean = result["scores"].get("linear", {}).get(e, {}).get("value")
                entry["stain_shift"] = {
                    "shifted": shifted,
                    "clean": clean,
                    "drop": None if clean is None else clean - shifted,
                }
            result["robustness"][e] = entry
    result["figures"]["embedding"] = plots.embeddings(
        figures / f"{name}_embedding.png",
        {e: f["features"] for e, f in feats.items()},
        tiles.labels,
        target,
        target_name,
        name,
    )
    return result


def slide_task(
    name: str, task: dict, encoders: dict[str, str], cfg: EvaluateConfig, out: Path
) -> dict:
    kind = task.get("task", "classification")
    per_encoder = run_slide_task(task, list(encoders), out / "tasks" / name, cfg.progress)
    first = next(iter(per_encoder.values()))
    located = {e: r["localization"] for e, r in per_encoder.items()}
    key = {
        "task": task,
        "encoders": encoders,
        "settings": _settings(cfg),
        "split": {k: first[k] for k in ("split", "n_train", "n_val", "folds")},
        "inputs": _digest(
            *(a for r in per_encoder.values() for a in (r["y"], r["preds"], r["groups"])),
            np.array(json.dumps(located, sort_keys=True)),  # per-seed localization AUCs
        ),
    }
    return cached_result(
        out / "tasks" / name / "result.json",
        key,
        lambda: _score_slides(name, task, kind, per_encoder, cfg, out),
    )


def _score_slides(name, task, kind, per_encoder, cfg, out) -> dict:
    from pipeline.eval import plots

    metric = "auc" if kind == "classification" else "c_index"
    col = task.get("model", "abmil")
    first = next(iter(per_encoder.values()))
    y, patients = first["y"], first["groups"]  # patients: the clusters of the bootstrap
    fn = slide_metric(kind, metric)
    scored = {}
    for e, r in per_encoder.items():
        ci = bootstrap_ci(
            lambda idx, r=r: fn(y, idx, r["preds"]),
            np.arange(len(y)),
            n=cfg.bootstrap,
            seed=cfg.seed,
            groups=patients,
        )
        per_seed = [s[metric] for s in r["per_seed"]]
        scored[e] = {
            "value": fn(y, np.arange(len(y)), r["preds"]),
            "ci": list(ci),
            "per_seed": per_seed,
            "seed_mean": float(np.mean(per_seed)),
            "seed_std": float(np.std(per_seed)),
            "metrics": classification_metrics(y, r["preds"])
            if kind == "classification"
            else {"c_index": fn(y, np.arange(len(y)), r["preds"])},
        }
    result = {
        "kind": "slide",
        "task": kind,
        "model": col,
        "split": first["split"],  # fixed (the labels' split column) or cv
        "n_items": len(y),  # the test slides (cross-validation: every slide)
        "n_patients": len(np.unique(patients)),
        "n_train": first["n_train"],
        "n_val": first["n_val"],
        "folds": first["folds"],
        "labels": str(task.get("labels")),
        "seeds": list(task.get("seeds", [0])),
        "columns": {col: {"metric": metric}},
        "scores": {col: scored},
        "comparisons": {
            col: _compare(
                {e: r["preds"] for e, r in per_encoder.items()},
                lambda idx, p: fn(y, idx, p),
                cfg,
                patients,
            )
        },
        "figures": {},
    }
    if first.get("localization") is not None:
        _localization_column(name, task, col, per_encoder, cfg, result)
    if kind == "classification":
        classes = np.array(first["classes"])
        curves = {e: (y, r["preds"]) for e, r in per_encoder.items()}
        result["classes"] = classes.tolist()
        result["figures"]["roc"] = plots.roc_curves(
            out / "figures" / f"{name}_roc.png", curves, classes, f"{name}: {col}"
        )
        result["figures"]["confusion"] = plots.confusion_matrices(
            out / "figures" / f"{name}_confusion.png", curves, classes, f"{name}: {col}"
        )
    else:
        result["figures"]["risk"] = plots.risk_groups(
            out / "figures" / f"{name}_km.png",
            {e: r["preds"] for e, r in per_encoder.items()},
            y,
            f"{name}: {col}",
        )
    return result


def _localization_column(name, task, col, per_encoder, cfg, result) -> None:
    """Adds ``<model>_localization`` to ``result``: per encoder, each test slide's
    localization AUC (its fold model's attention against the tile labels) averaged over the
    seeds (slides scored in every seed), the mean over slides with a bootstrap CI resampling
    patients, and paired comparisons of the encoders on their common slides. Left out, with
    a warning, when no slide has both positive and negative labelled tiles."""
    tile_labels = task.get("tile_labels") or task.get("mil", {}).get("tile_labels")
    per_slide: dict[str, dict[str, float]] = {}
    for e, r in per_encoder.items():
        seeds = r["localization"]
        common = set.intersection(*(set(s) for s in seeds)) if seeds else set()
        per_slide[e] = {s: float(np.mean([run[s] for run in seeds])) for s in sorted(common)}
    if not all(per_slide.values()):
        log.warning(
            "task %s: no test slide has both positive and negative tiles in %s, so no "
            "localization AUC can be computed; leaving out the column %s_localization",
            name,
            tile_labels,
            col,
        )
        return
    case_of = {
        s: c
        for r in per_encoder.values()
        for s, c in zip(r["slide_ids"], r["groups"].tolist(), strict=True)
    }

    def mean(idx, values):
        return float(np.mean(values[idx]))

    scored = {}
    for e, slides in per_slide.items():
        values = np.array(list(slides.values()))
        ci = bootstrap_ci(
            lambda idx, values=values: mean(idx, values),
            np.arange(len(values)),
            n=cfg.bootstrap,
            seed=cfg.seed,
            groups=np.array([case_of[s] for s in slides]),
        )
        per_seed = [
            float(np.mean([run[s] for s in slides])) for run in per_encoder[e]["localization"]
        ]
        scored[e] = {
            "value": float(values.mean()),
            "ci": list(ci),
            "n_slides": len(values),
            "per_slide": slides,
            "per_seed": per_seed,
        }
    common = sorted(set.intersection(*(set(v) for v in per_slide.values())))
    loc = f"{col}_localization"
    result["columns"][loc] = {
        "metric": "localization_auc",
        "title": f"{col} localization AUC",
        "tile_labels": str(tile_labels),
    }
    result["scores"][loc] = scored
    result["comparisons"][loc] = (
        _compare(
            {e: np.array([v[s] for s in common]) for e, v in per_slide.items()},
            mean,
            cfg,
            np.array([case_of[s] for s in common]),
        )
        if common
        else []
    )


def run_suite(cfg: EvaluateConfig) -> dict:
    """Every task for every encoder; writes the outputs and returns ``results.json``'s dict."""
    from pipeline.encoders import load_encoder, spec_weights
    from pipeline.eval.report import write_outputs
    from pipeline.extract import resolve_device

    encoders = selected_encoders(cfg)
    if not cfg.tasks:
        raise ConfigError("the suite has no tasks; see configs/benchmarks/demo.yaml")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    device = resolve_device(cfg.device)
    loaded: dict = {}

    def get_encoder(name: str):
        if name not in loaded:
            loaded[name] = load_encoder(encoders[name], device=device, weights_map=cfg.weights_map)
        return loaded[name]

    # random-init encoders are baselines: results, leaderboard and report say so
    weights = {e: spec_weights(spec) for e, spec in encoders.items()}
    results = {"encoders": encoders, "weights": weights, "tasks": {}}
    for i, task in enumerate(cfg.tasks):
        name = str(task.get("name") or f"task{i}")
        kind = task.get("kind", "tile")
        log.info("task %s (%s)", name, kind)
        try:
            if kind == "tile":
                result = tile_task(name, task, encoders, cfg, out, get_encoder, device)
            elif kind == "slide":
                result = slide_task(name, task, encoders, cfg, out)
            else:
                raise ConfigError(f"task {name}: unknown kind '{kind}' (tile or slide)")
            result["status"] = "ok"
        except Exception as exc:  # one task's failure is reported; the others still run
            if not isinstance(exc, PipelineError | ConfigError):
                log.error("task %s: %s", name, traceback.format_exc())
            log.error("task %s failed: %s", name, exc)
            result = {"kind": kind, "status": "failed", "error": f"{exc}"}
        results["tasks"][name] = result
        write_outputs(results, out)  # partial results survive an interruption
    return json.loads((out / "results.json").read_text())
