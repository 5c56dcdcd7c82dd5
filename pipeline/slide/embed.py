"""``cpath slide-embed``: unsupervised slide embeddings (PANTHER, COBRA) and a linear head on them.

    cpath slide-embed --features runs/feats --train_slides train.txt --prototypes 16 --out runs/panther
    cpath slide-embed --action head --embeddings runs/panther/embeddings.h5 --labels labels.csv --folds 5 --out runs/panther/head

``--action embed`` (the default) writes under ``out``: ``prototypes.npy`` (C x d, k-means
of tiles of the ``--train_slides``) and ``embeddings.h5`` (dataset ``embeddings`` N x D with
D = C + 2Cd, ``slide_ids``; attrs ``method``, ``C``, ``d``, the encoder attributes of the
first feature file, ``config`` as JSON and a fingerprint of the inputs). A rerun with the
same feature files and settings skips. ``--action head`` cross-validates a linear head
(:mod:`pipeline.slide.head`) with the patient-grouped folds of ``train-mil`` and writes
``metrics.json``, ``predictions.csv`` and ``splits.csv``: with ``--task classification`` (the
default) a bias-free logistic regression on ``slide_id, case_id, label`` (balanced accuracy,
AUC); with ``--task survival`` a linear Cox model (L2-penalised, Efron's ties, fitted by
L-BFGS on torchsurv's partial likelihood) on ``slide_id, case_id, time, event``, folds
stratified by event, scored by Harrell's C-index (predictions: ``slide_id, case_id, fold,
time, event, risk``, risk the log relative hazard).

    cpath slide-embed --action head --task survival --embeddings runs/panther/embeddings.h5 --labels survival.csv --out runs/panther/cox
See :mod:`pipeline.slide.panther` (Song et al., CVPR 2024).

``--method cobra`` (Lenz et al., CVPR 2025) embeds every slide of ``--features`` (any
model's) as the attention-weighted mean of its tile features, the attention computed by a
``cpath train-slide-encoder`` encoder (``--slide_encoder``) from a model it was trained on
(``--attention_features``, default ``--features`` itself), tiles matched by level-0 coords;
``embeddings.h5`` then holds N x D with D the width of ``--features`` (attrs ``method``,
``d``, ``attention_model``), read by ``--action head`` as PANTHER's:

    cpath slide-embed --method cobra --slide_encoder runs/cobra --features runs/feats/new \
        --attention_features runs/feats/uni --out runs/cobra_new
See :mod:`pipeline.slide.cobra`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

ENCODER_ATTRS = (
    "encoder",
    "encoder_sha256",
    "encoder_key",
    "output_mode",
    "weights",
    "embed_dim",
    "pooling",
    "precision",
    "target_mpp",
    "patch_size",
    "stain_norm",
)
#: settings that change the embeddings (the others only change how they are computed)
EMBED_KEYS = (
    "method",
    "prototypes",
    "samples_per_prototype",
    "kmeans_init",
    "kmeans_iter",
    "em_iter",
    "tau",
    "eps",
    "seed",
    "attention_model",
)


@dataclass
class SlideEmbedConfig:
    """Unsupervised slide embeddings from per-slide tile features, and a linear head on them.

    Args:
        action: ``embed`` (features -> prototypes.npy and embeddings.h5) or ``head``
            (cross-validated linear head on an embeddings.h5 -> metrics.json).
        task: the head's task: ``classification`` (bias-free logistic regression on
            ``label``; balanced accuracy, AUC) or ``survival`` (linear Cox model on
            ``time``, ``event``, Efron's ties; Harrell's C-index).
        method: slide embedding method; ``panther`` (Song et al., CVPR 2024): a Gaussian
            mixture per slide, fitted by MAP-EM with morphological prototypes as prior;
            ``cobra`` (Lenz et al., CVPR 2025): the tile features weighted by the attention
            of a trained COBRA encoder (``--slide_encoder``).
        features: folder of per-slide feature files (``cpath extract``'s output).
        slide_encoder: ``cobra``: output folder of ``cpath train-slide-encoder``.
        attention_features: ``cobra``: feature folder of a model the encoder was trained on,
            whose attention weighs the tiles of ``features`` (matched by slide id and tile
            coordinates); default ``features`` itself.
        attention_model: ``cobra``: the encoder's input name for ``attention_features``;
            default the input whose recorded encoder matches the files' (or, where either
            lacks an encoder name, the one input of their width).
        train_slides: text file of slide ids (one a line) whose tiles fit the prototypes;
            default all slides, so the prototypes also see the test slides.
        prototypes: number of prototypes C (mixture components).
        samples_per_prototype: tiles sampled for k-means per prototype (C times this in
            all, an equal share from each training slide).
        kmeans_init: k-means restarts.
        kmeans_iter: k-means iterations.
        em_iter: EM iterations per slide.
        tau: weight of the prototype prior in the M-step.
        eps: prior (and initial) variance of every component.
        seed: seed of the tile sampling, k-means and the folds.
        device: auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N.
        embeddings: embeddings.h5 for ``--action head``.
        labels: CSV for ``--action head``: slide_id, label (classification) or slide_id,
            time, event (survival; event 1 = observed, 0 = censored), and (recommended)
            case_id.
        splits: a splits.csv (``train-mil``'s layout) to use instead of making folds.
        folds: cross-validation folds, grouped by case_id (stratified by label, or by event
            for survival), for ``--action head``.
        reg: inverse L2 strength of the linear head (scikit-learn's ``C``): the objective is
            ``reg`` times the summed loss plus ``0.5 ||w||^2``. For survival the loss is the
            Cox negative partial log-likelihood, i.e. lifelines' ``penalizer = 1 / (reg n)``
            for ``n`` training slides.
        standardize: z-score the embeddings with the training slides' statistics before
            the linear head (not in the reference).
        out: output folder.
    """

    action: Literal["embed", "head"] = "embed"
    task: Literal["classification", "survival"] = "classification"
    method: Literal["panther", "cobra"] = "panther"
    features: Path | None = None
    slide_encoder: Path | None = None
    attention_features: Path | None = None
    attention_model: str | None = None
    train_slides: Path | None = None
    prototypes: int = 16
    samples_per_prototype: int = 10000
    kmeans_init: int = 5
    kmeans_iter: int = 50
    em_iter: int = 1
    tau: float = 1.0
    eps: float = 1.0
    seed: int = 0
    device: str = "auto"
    embeddings: Path | None = None
    labels: Path | None = None
    splits: Path | None = None
    folds: int = 5
    reg: float = 1.0
    standardize: bool = True
    out: Path = Path("runs/slide_embed")


def feature_files(folder: Path | None) -> list[Path]:
    """The ``.h5`` feature files of ``folder`` (``cpath extract``'s output), sorted; a clear
    error when there is no folder or no file."""
    from pipeline.errors import PipelineError

    if folder is None:
        raise PipelineError("--features is required: the folder of cpath extract's .h5 files")
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"{folder}: no such folder; point --features at cpath extract's output")
    files = sorted(p for p in folder.glob("*.h5") if not p.name.startswith("."))
    if not files:
        raise PipelineError(
            f"{folder}: no .h5 feature files; run `cpath extract` first or point --features "
            "at the folder it wrote"
        )
    return files


def read_slide_list(path: Path, known: list[str]) -> list[str]:
    from pipeline.errors import PipelineError

    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read the training slide list ({exc})") from exc
    ids = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    unknown = sorted(set(ids) - set(known))
    if unknown:
        raise PipelineError(
            f"{path}: {len(unknown)} slide ids have no feature file ({', '.join(unknown[:3])}); "
            "list slide ids as the feature files are named, without .h5"
        )
    if not ids:
        raise PipelineError(f"{path}: no slide ids; write one training slide id a line")
    return ids


def fingerprint(
    files: list[Path], train_ids: list[str], cfg: SlideEmbedConfig, extra: list[Path] = ()
) -> str:
    """A hash of the input files' names, sizes and times, ``extra`` files' paths and stamps,
    the training slides and :data:`EMBED_KEYS`."""
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    stamp += [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in extra]
    settings = {k: getattr(cfg, k) for k in EMBED_KEYS}
    blob = json.dumps([stamp, sorted(train_ids), settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def stored_fingerprint(path: Path) -> str | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            value = f.attrs.get("fingerprint")
    except OSError:
        return None
    return value.decode() if isinstance(value, bytes) else value


def embed(cfg: SlideEmbedConfig) -> Path:
    """Slide embeddings of every slide of ``cfg.features`` by ``cfg.method`` ->
    ``embeddings.h5`` (PANTHER: and ``prototypes.npy``)."""
    import h5py
    import numpy as np

    from pipeline.config import config_to_dict
    from pipeline.errors import PipelineError
    from pipeline.features import read_features
    from pipeline.io import atomic_path

    files = feature_files(cfg.features)
    ids = [p.stem for p in files]
    extra: list[Path] = []
    if cfg.method == "cobra":
        train_ids = ids
        if cfg.train_slides is not None:
            log.info("--train_slides is not used by --method cobra (nothing is fitted here)")
        extra = cobra_inputs(cfg)
    elif cfg.train_slides is None:
        train_ids = ids
        log.warning(
            "no --train_slides: the prototypes are fitted on all %d slides, test slides "
            "included; give the training slides of your split for an unbiased evaluation",
            len(ids),
        )
    else:
        train_ids = read_slide_list(cfg.train_slides, ids)
    out = Path(cfg.out)
    target = out / "embeddings.h5"
    stamp = fingerprint(files, train_ids, cfg, extra)
    if target.exists() and stored_fingerprint(target) == stamp:
        log.info("%s is up to date with its inputs; skipping", target)
        return target

    if cfg.method == "cobra":
        emb, method_attrs = cobra_embeddings(cfg, files)
    else:
        emb, method_attrs = panther_embeddings(cfg, files, ids, train_ids)
    if not np.isfinite(emb).all():
        raise PipelineError(
            f"{cfg.features}: non-finite embeddings; check the features for NaN or huge values"
        )
    first_attrs = read_features(files[0])[2]
    with atomic_path(target) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("embeddings", data=emb)
        f.create_dataset("slide_ids", data=np.array(ids, dtype=h5py.string_dtype()))
        f.attrs["method"] = cfg.method
        for key, value in method_attrs.items():
            f.attrs[key] = value
        for key in ENCODER_ATTRS:
            if key in first_attrs:
                value = first_attrs[key]
                f.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value
        f.attrs["config"] = json.dumps(config_to_dict(cfg), default=str)
        f.attrs["train_slides"] = json.dumps(train_ids)
        f.attrs["fingerprint"] = stamp
    log.info("%d slide embeddings of length %d -> %s", len(ids), emb.shape[1], target)
    return target


def panther_embeddings(cfg: SlideEmbedConfig, files: list[Path], ids: list[str], train_ids):
    """PANTHER: prototypes of the training slides' tiles (written to ``prototypes.npy``) and
    ``(embeddings N x (C + 2Cd), attrs)``."""
    import numpy as np
    import torch

    from pipeline.errors import PipelineError
    from pipeline.features import read_features
    from pipeline.io import atomic_path
    from pipeline.slide.panther import (
        embedding_length,
        fit_prototypes,
        panther_embed,
        sample_tiles,
    )

    by_id = dict(zip(ids, files, strict=True))
    quota = math.ceil(cfg.prototypes * cfg.samples_per_prototype / len(train_ids))
    sampled, dim = [], None
    for i, sid in enumerate(train_ids):
        feats, _, _ = read_features(by_id[sid])  # N x d
        dim = dim or feats.shape[1]
        sampled.append(sample_tiles([feats], quota, seed=cfg.seed + i))
    tiles = np.concatenate(sampled)  # M x d
    if len(tiles) < cfg.prototypes:
        raise PipelineError(
            f"{cfg.features}: the training slides have {len(tiles)} tiles, fewer than "
            f"--prototypes {cfg.prototypes}; lower --prototypes or add slides"
        )
    protos = fit_prototypes(
        tiles, cfg.prototypes, seed=cfg.seed, n_init=cfg.kmeans_init, max_iter=cfg.kmeans_iter
    )  # C x d
    with atomic_path(Path(cfg.out) / "prototypes.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, protos)

    device = resolve_device(cfg.device)
    dtype = torch.float32 if device.type == "cuda" else torch.float64
    rows = []
    for path in files:
        feats, _, _ = read_features(path)
        check_width(path, feats, dim)
        rows.append(
            panther_embed(
                [feats], protos, cfg.em_iter, cfg.tau, cfg.eps, device=device, dtype=dtype
            )[0]
        )
    emb = np.stack(rows)  # N x (C + 2Cd)
    assert emb.shape[1] == embedding_length(cfg.prototypes, dim)
    attrs = {
        "C": cfg.prototypes,
        "d": dim,
        "layout": "pi (C), mu (C x d), Sigma (C x d, variances)",
    }
    return emb, attrs


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_width(path: Path, feats, dim: int | None) -> None:
    from pipeline.errors import PipelineError

    if feats.ndim != 2 or (dim is not None and feats.shape[1] != dim) or len(feats) == 0:
        raise PipelineError(
            f"{path}: features of shape {feats.shape}, expected N x {dim} with N > 0; "
            "use one encoder's features and drop empty slides"
        )


def cobra_inputs(cfg: SlideEmbedConfig) -> list[Path]:
    """The files besides ``--features`` that COBRA embeddings depend on (for the
    fingerprint): the encoder's and the attention folder's."""
    from pipeline.errors import ConfigError

    if cfg.slide_encoder is None:
        raise ConfigError(
            "--method cobra needs --slide_encoder: the --out folder of cpath train-slide-encoder"
        )
    folder = Path(cfg.slide_encoder)
    paths = [folder / "encoder.json", folder / "encoder.safetensors"]
    for p in paths:
        if not p.is_file():
            raise ConfigError(
                f"{p}: missing; --slide_encoder must be the --out folder of a finished "
                "cpath train-slide-encoder run"
            )
    if cfg.attention_features is not None:
        paths += feature_files(cfg.attention_features)
    return paths


def attention_input(meta: dict, requested: str | None, attrs: dict, dim: int, where: Path) -> str:
    """The encoder input (model name) for attention features with ``attrs`` and width ``dim``."""
    from pipeline.errors import ConfigError

    inputs = meta["inputs"]
    known = ", ".join(f"{k} ({v['dim']})" for k, v in inputs.items())
    if requested is not None:
        if requested not in inputs:
            raise ConfigError(
                f"--attention_model {requested!r}: not an input of the encoder; it knows {known}"
            )
        name = requested
    else:
        same = [
            k
            for k, v in inputs.items()
            if attrs.get("encoder") and v.get("encoder") == attrs["encoder"]
        ]
        wide = [k for k, v in inputs.items() if v["dim"] == dim]
        same = [k for k in same if k in wide]
        # by width only where the encoder names cannot tell (a model of the same width
        # but another recorded encoder is a different model)
        unnamed = [k for k in wide if not (attrs.get("encoder") and inputs[k].get("encoder"))]
        if len(same) == 1:
            name = same[0]
        elif not same and len(unnamed) == 1 and len(wide) == 1:
            name = unnamed[0]
        else:
            raise ConfigError(
                f"{where}: cannot tell which of the encoder's inputs ({known}) these "
                f"{dim}-wide features are; give --attention_model NAME, or "
                "--attention_features with a model it was trained on"
            )
    if inputs[name]["dim"] != dim:
        raise ConfigError(
            f"{where}: {dim} features a tile, but the encoder's input {name!r} takes "
            f"{inputs[name]['dim']}; give --attention_features of a model it was trained on"
        )
    return name


def cobra_embeddings(cfg: SlideEmbedConfig, files: list[Path]):
    """COBRA: ``(embeddings N x D, attrs)``, each row the attention-weighted mean of a slide's
    tile features (D their width), the attention from ``--attention_features``."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from pipeline.errors import PipelineError
    from pipeline.features import read_features
    from pipeline.slide.cobra import aggregate, sort_yx
    from pipeline.slide.cobra_train import load_encoder

    encoder, meta = load_encoder(cfg.slide_encoder)
    device = resolve_device(cfg.device)
    encoder.to(device)
    att_folder = Path(cfg.attention_features or cfg.features)
    att_files = {p.stem: p for p in feature_files(att_folder)}
    missing = [p.stem for p in files if p.stem not in att_files]
    if missing:
        raise PipelineError(
            f"{att_folder}: no feature file for {len(missing)} slides of {cfg.features} "
            f"({', '.join(missing[:3])}); extract them with the attention model too"
        )
    name, dim, rows = None, None, []
    for path in tqdm(files, desc="slide-embed cobra", unit="slide"):
        feats, coords, _ = read_features(path)  # N_b x D_b, N_b x 2
        check_width(path, feats, dim)
        dim = feats.shape[1]
        att_path = att_files[path.stem]
        a_feats, a_coords, a_attrs = read_features(att_path)  # N_a x D_a, N_a x 2
        check_width(att_path, a_feats, None)
        if name is None:
            name = attention_input(meta, cfg.attention_model, a_attrs, a_feats.shape[1], att_folder)
        if len(coords) != len(feats) or len(a_coords) != len(a_feats):
            if att_path != path:
                raise PipelineError(
                    f"{path} or {att_path}: no tile coords to match the two models' tiles; "
                    "extract with cpath extract, which stores them"
                )
            coords = a_coords = np.stack([np.arange(len(feats)), np.zeros(len(feats))], 1)
        order = sort_yx(a_coords)
        x = torch.as_tensor(a_feats[order], dtype=torch.float32, device=device)[None]  # 1 x N x D
        with torch.no_grad():
            out = encoder(name, x, torch.ones(x.shape[:2], dtype=torch.bool, device=device))
        attention = out["attention"][0].double().cpu().numpy()  # N_a
        try:
            rows.append(aggregate(attention, a_coords[order], feats, coords))  # D_b
        except ValueError as exc:
            raise PipelineError(
                f"{path}: no tile coordinates in common with {att_path}; both must come from "
                "the same coords file (cpath preprocess) of the slide"
            ) from exc
    attrs = {
        "d": dim,
        "attention_model": name,
        "slide_encoder": str(cfg.slide_encoder),
        "layout": "attention-weighted mean of the tile features (d)",
    }
    return np.stack(rows), attrs


def read_embeddings(path: Path):
    """``(embeddings N x D, slide_ids, attrs)`` of an embeddings.h5."""
    import h5py
    import numpy as np

    from pipeline.errors import PipelineError

    try:
        with h5py.File(path, "r") as f:
            x = np.asarray(f["embeddings"][:])
            ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["slide_ids"][:]]
            attrs = dict(f.attrs)
    except (OSError, KeyError) as exc:
        raise PipelineError(
            f"{path}: cannot read the slide embeddings ({exc}); run cpath slide-embed first"
        ) from exc
    return x, ids, attrs


def read_labels(path: Path) -> list[dict]:
    from pipeline.errors import PipelineError

    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise PipelineError(f"{path}: cannot read the labels ({exc})") from exc
    missing = {"slide_id", "label"} - set(rows[0] if rows else {})
    if missing:
        raise PipelineError(f"{path}: missing columns {sorted(missing)}; need slide_id,label")
    if "case_id" not in rows[0]:
        log.warning(
            "%s has no case_id column: each slide counts as its own patient; add case_id", path
        )
    for r in rows:
        r["case_id"] = r.get("case_id") or r["slide_id"]
    return rows


def head(cfg: SlideEmbedConfig) -> Path:
    """Cross-validated linear head on ``cfg.embeddings``: a bias-free classifier or, with
    ``task: survival``, a linear Cox model."""
    from pipeline.config import save_config
    from pipeline.errors import ConfigError, PipelineError
    from pipeline.io import atomic_write_text, write_manifest
    from pipeline.mil.splits import read_splits, splits_mismatch, write_splits
    from pipeline.slide.head import cross_validate, cross_validate_survival

    if cfg.embeddings is None or cfg.labels is None:
        raise ConfigError("--action head needs --embeddings FILE and --labels CSV")
    if cfg.task not in ("classification", "survival"):
        raise ConfigError(f"--task must be classification or survival, not {cfg.task!r}")
    x, ids, _ = read_embeddings(cfg.embeddings)
    if cfg.task == "survival":
        from pipeline.mil.training import read_labels as read_task_labels

        try:
            rows = read_task_labels(Path(cfg.labels), "survival")
        except (ValueError, TypeError) as exc:
            raise PipelineError(
                f"{cfg.labels}: time and event must be numbers ({exc}); event 1 = observed, "
                "0 = censored"
            ) from exc
    else:
        rows = read_labels(cfg.labels)
    index = {s: i for i, s in enumerate(ids)}
    missing = [r["slide_id"] for r in rows if r["slide_id"] not in index]
    if missing:
        log.warning(
            "%d labelled slides have no embedding and are left out (%s)",
            len(missing),
            ", ".join(missing[:3]),
        )
    rows = [r for r in rows if r["slide_id"] in index]
    if not rows:
        raise PipelineError(f"{cfg.labels}: none of its slide ids is in {cfg.embeddings}")
    splits = None
    if cfg.splits is not None:
        splits = read_splits(cfg.splits)
        why = splits_mismatch(splits, rows, exact=False)
        if why:
            raise PipelineError(f"{cfg.splits}: these splits do not fit the labels: {why}")
    common = {
        "case_ids": [r["case_id"] for r in rows],
        "folds": cfg.folds,
        "seed": cfg.seed,
        "reg": cfg.reg,
        "standardize": cfg.standardize,
        "splits": splits,
        "slide_ids": [r["slide_id"] for r in rows],
    }
    x = x[[index[r["slide_id"]] for r in rows]]
    if cfg.task == "survival":
        result = cross_validate_survival(
            x, [r["time"] for r in rows], [r["event"] for r in rows], **common
        )
    else:
        result = cross_validate(x, [r["label"] for r in rows], **common)
    out = Path(cfg.out)
    write_splits(out / "splits.csv", result["splits"])
    preds = result["predictions"]
    write_manifest(out / "predictions.csv", preds, list(preds[0]))
    keys = (
        ("folds", "mean", "std") if cfg.task == "survival" else ("classes", "folds", "mean", "std")
    )
    metrics = {"task": cfg.task, **{k: result[k] for k in keys}}
    metrics["embeddings"] = str(cfg.embeddings)
    path = atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    save_config(cfg, out)
    if cfg.task == "survival":
        log.info(
            "linear Cox head: C-index %.3f (mean of %d folds) -> %s",
            result["mean"]["c_index"],
            len(result["folds"]),
            path,
        )
    else:
        log.info(
            "linear head: balanced accuracy %.3f, AUC %.3f (mean of %d folds) -> %s",
            result["mean"]["balanced_accuracy"],
            result["mean"]["auc"],
            len(result["folds"]),
            path,
        )
    return path


def run(cfg: SlideEmbedConfig) -> int:
    if cfg.action == "head":
        head(cfg)
    else:
        embed(cfg)
    return 0
