"""``cpath curate``: cluster-balanced sampling weights of pretraining tiles.

    cpath curate --features runs/feats --clusters [256,32] --out runs/curate
    cpath curate --coords runs/prep/coords --encoder models/run/encoder --out runs/curate
    cpath pretrain --config configs/pretrain/tiny-cpu.yaml --data.coords runs/prep/coords --data.weights runs/curate/weights.h5

The tiles' features (``cpath extract``'s files; with ``--encoder`` this stage extracts
them first into ``OUT/features``, resumably) are clustered by hierarchical k-means
(:mod:`pipeline.curation.kmeans`) and each tile gets the weight that makes every
top-level cluster equally likely, every child cluster equally likely within its parent
(:mod:`pipeline.curation.weights`): the automatic curation of Vo et al. (2024),
"Automatic Data Curation for Self-Supervised Learning: A Clustering-Based Approach", as
sampling weights rather than a fixed subset, in the spirit of RudolfV's grouping and
rebalancing of tiles (Dippel et al., 2024). ``--groups`` (CSV ``slide_id,group``: e.g.
organ, site or stain) then sets each group's total share (``--group_weights``, or equal).

Outputs in ``OUT``: ``weights.h5`` (:mod:`pipeline.curation.store`), ``clusters.csv``
(per level and cluster: parent, tiles, share of tiles, share of the weighted stream),
``report.html`` (:mod:`pipeline.curation.report`) and ``config.yaml``. A rerun with the
same feature files and settings skips.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.slide.embed import ENCODER_ATTRS, feature_files

log = logging.getLogger(__name__)

#: settings that change the weights (the others only change how they are computed or shown)
CURATE_KEYS = ("clusters", "normalize", "n_init", "max_iter", "fit_tiles", "group_weights", "seed")


@dataclass
class CurateConfig:
    """Cluster-balanced sampling weights of pretraining tiles (hierarchical k-means).

    Args:
        features: folder of per-slide feature files (`cpath extract`'s output).
        coords: coords folder of `cpath preprocess` (or one .h5, or a text list of them):
            with --encoder, the tiles to extract features of into OUT/features; without,
            where the report reads its example tiles (default: the feature files' own
            coords and slide paths).
        encoder: extract features with this encoder first (as `cpath extract --encoder`);
            needs --coords.
        encoder_weights: local weights of the encoder (as `cpath extract --encoder_weights`).
        batch_size: tiles per forward pass when extracting.
        workers: DataLoader worker processes when extracting.
        device: device of the extraction: auto, cpu, cuda, cuda:N.
        clusters: clusters per level of the hierarchical k-means, finest first, strictly
            decreasing (Vo et al. use four levels on 10^9 images; one or two suit 10^4-10^6
            tiles). The last level's clusters are made equally likely.
        normalize: L2-normalise the features first (k-means then follows cosine similarity).
        n_init: k-means restarts per level.
        max_iter: k-means iterations per restart.
        fit_tiles: fit the finest level on a random sample of this many tiles, then assign
            every tile to its nearest centroid (None: fit on all).
        backend: k-means implementation: auto (faiss when importable, else scikit-learn),
            faiss or sklearn.
        groups: CSV with columns slide_id,group (organ, site, stain, ...): each group's total
            share of the weighted stream is set by --group_weights; every slide of the
            features needs a row.
        group_weights: share of each group, e.g. {colon: 2, lung: 1} (relative; None: all
            groups alike). Needs --groups.
        examples: example tiles shown per top-level cluster in the report.
        report_clusters: top-level clusters shown with example tiles (the largest first).
        seed: seed of the k-means, the fitting sample and the report's examples.
        out: output folder.
        progress: show progress bars.
    """

    features: Path | None = None
    coords: Path | None = None
    encoder: str | None = None
    encoder_weights: Path | None = None
    batch_size: int = 256
    workers: int = 4
    device: str = "auto"
    clusters: list[int] = field(default_factory=lambda: [256, 32])
    normalize: bool = True
    n_init: int = 1
    max_iter: int = 100
    fit_tiles: int | None = 500_000
    backend: Literal["auto", "faiss", "sklearn"] = "auto"
    groups: Path | None = None
    group_weights: dict[str, float] | None = None
    examples: int = 8
    report_clusters: int = 32
    seed: int = 0
    out: Path = Path("runs/curate")
    progress: bool = True


def extract_features(cfg: CurateConfig) -> Path:
    """Run ``cpath extract`` on ``cfg.coords`` with ``cfg.encoder`` into ``OUT/features``
    (slides done before are skipped); returns that folder."""
    from pipeline.errors import ConfigError, PipelineError
    from pipeline.extract import ExtractConfig
    from pipeline.extraction import extract

    if cfg.coords is None:
        raise ConfigError("--encoder needs --coords: the coords folder of `cpath preprocess`")
    folder = Path(cfg.out) / "features"
    rows = extract(
        ExtractConfig(
            coords=cfg.coords,
            encoder=cfg.encoder,
            encoder_weights=cfg.encoder_weights,
            out=folder,
            batch_size=cfg.batch_size,
            workers=cfg.workers,
            device=cfg.device,
            seed=cfg.seed,
            progress=cfg.progress,
        )
    )
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        raise PipelineError(
            f"{folder}: feature extraction failed for {len(failed)} slides (first: "
            f"{failed[0]['slide_id']}: {failed[0]['error']}); fix or drop them from --coords "
            "and rerun (finished slides are kept)"
        )
    return folder


def read_groups(path: Path, slide_ids: list[str]) -> dict[str, str]:
    """``{slide_id: group}`` from a CSV with columns slide_id,group; every slide needs one."""
    from pipeline.errors import ConfigError
    from pipeline.io import read_slide_column

    groups = read_slide_column(path, "group", "groups CSV")
    missing = [s for s in slide_ids if s not in groups]
    if missing:
        raise ConfigError(
            f"{path}: no group for {len(missing)} slides ({', '.join(missing[:5])}); add a row "
            "slide_id,group for each"
        )
    return groups


def fingerprint(files: list[Path], cfg: CurateConfig) -> str:
    """A hash of the feature files (name, size, mtime), the groups CSV and the settings."""
    from pipeline.io import sha256_file

    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    groups = sha256_file(cfg.groups) if cfg.groups and Path(cfg.groups).is_file() else None
    settings = {k: getattr(cfg, k) for k in CURATE_KEYS}
    blob = json.dumps([stamp, groups, settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_settings(cfg: CurateConfig) -> None:
    from pipeline.errors import ConfigError

    clusters = list(cfg.clusters or [])
    if not clusters or any(int(k) < 1 for k in clusters):
        raise ConfigError(f"--clusters {clusters}: give one or more positive cluster counts")
    if any(a <= b for a, b in zip(clusters, clusters[1:], strict=False)):
        raise ConfigError(
            f"--clusters {clusters}: counts must decrease from the finest level to the top, "
            "e.g. [256,32]"
        )
    if cfg.group_weights and cfg.groups is None:
        raise ConfigError("--group_weights needs --groups, a CSV of slide_id,group")
    if cfg.backend == "faiss":
        from pipeline.curation.kmeans import faiss_available

        if not faiss_available():
            raise ConfigError("--backend faiss: faiss is not installed; use auto or sklearn")


def load_features(files: list[Path], progress: bool):
    """Features of every non-empty slide: ``(X N x D float32, slides, attrs of the first)``,
    ``slides`` a list of ``(slide_id, path, coords N_s x 2, attrs)``."""
    import numpy as np
    from tqdm.auto import tqdm

    from pipeline.errors import PipelineError
    from pipeline.features import read_features

    parts, slides, first, encoder = [], [], None, None
    for path in tqdm(files, desc="read features", disable=not progress):
        feats, coords, attrs = read_features(path)
        if feats.ndim != 2 or len(feats) != len(coords):
            raise PipelineError(
                f"{path}: features {feats.shape} do not match coords {coords.shape}; "
                "rerun `cpath extract` on this slide"
            )
        if len(feats) == 0:
            log.info("%s: no tiles; skipped", path)
            continue
        key = (attrs.get("encoder"), attrs.get("encoder_sha256"), feats.shape[1])
        if first is None:
            first, encoder = attrs, key
        elif key != encoder:
            raise PipelineError(
                f"{path}: features of encoder {key[0]} ({key[2]} wide), the others of "
                f"{encoder[0]} ({encoder[2]} wide); curate the features of one encoder"
            )
        parts.append(np.asarray(feats, np.float32))
        slides.append((str(attrs.get("slide_id") or path.stem), path, coords, attrs))
    if not parts:
        raise PipelineError(
            f"{files[0].parent}: every feature file is empty; check `cpath preprocess`'s tiles"
        )
    ids = [s[0] for s in slides]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise PipelineError(f"{files[0].parent}: slide ids listed twice: {twice[:5]}")
    return np.concatenate(parts), slides, first  # N x D


def run(cfg: CurateConfig) -> int:
    import numpy as np

    from pipeline.config import config_to_dict, save_config
    from pipeline.curation.kmeans import hierarchical_kmeans
    from pipeline.curation.report import cluster_table, write_clusters_csv, write_report
    from pipeline.curation.store import SlideWeights, read_attrs, write_weights
    from pipeline.curation.weights import balanced_weights, group_balanced
    from pipeline.errors import ConfigError, PipelineError

    check_settings(cfg)
    if cfg.encoder:
        folder = extract_features(cfg)
    elif cfg.features is not None:
        folder = Path(cfg.features)
    else:
        raise ConfigError(
            "curate needs tile features: --features FOLDER (`cpath extract`'s output), or "
            "--coords OUT/coords with --encoder to extract them first"
        )
    files = feature_files(folder)
    out = Path(cfg.out)
    target = out / "weights.h5"
    stamp = fingerprint(files, cfg)
    done = all((out / name).exists() for name in ("clusters.csv", "report.html"))
    if done and read_attrs(target).get("fingerprint") == stamp:
        log.info("%s is up to date with its inputs; skipping", target)
        print(f"curate: {target} is up to date; skipped")
        return 0

    x, slides, first = load_features(files, cfg.progress)  # N x D
    ids = [s[0] for s in slides]
    groups = read_groups(cfg.groups, ids) if cfg.groups is not None else None
    if cfg.clusters[0] > len(x):
        raise ConfigError(
            f"--clusters {cfg.clusters}: {cfg.clusters[0]} clusters at the finest level but "
            f"only {len(x)} tiles in {folder}; lower the counts"
        )
    if not np.isfinite(x).all():
        raise PipelineError(f"{folder}: features with NaN or inf; rerun `cpath extract`")
    if cfg.normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # N x D
    tree = hierarchical_kmeans(
        x,
        cfg.clusters,
        seed=cfg.seed,
        n_init=cfg.n_init,
        max_iter=cfg.max_iter,
        fit_tiles=cfg.fit_tiles,
        backend=cfg.backend,
        progress=cfg.progress,
    )
    weights = balanced_weights(tree.labels)  # N
    sizes = [len(s[2]) for s in slides]
    slide_of = np.repeat(np.arange(len(slides)), sizes)  # N
    group_of = None
    if groups is not None:
        group_of = np.array([groups[ids[s]] for s in slide_of])
        try:
            weights = group_balanced(weights, group_of, cfg.group_weights)
        except ValueError as exc:
            raise ConfigError(f"--groups {cfg.groups} / --group_weights: {exc}") from exc

    starts = np.concatenate([[0], np.cumsum(sizes)])
    rows = []
    for s, (sid, path, coords, attrs) in enumerate(slides):
        at = slice(starts[s], starts[s + 1])
        meta = {
            "features": str(path),
            "slide_path": attrs.get("slide_path"),
            "coords_sha256": attrs.get("coords_sha256"),
            "group": None if group_of is None else str(group_of[starts[s]]),
        }
        rows.append(SlideWeights(sid, coords, tree.labels[at], weights[at], meta))
    table = cluster_table(tree.labels, weights)
    attrs = {k: first[k] for k in ENCODER_ATTRS if k in first}
    attrs.update(
        {
            "config": config_to_dict(cfg),
            "clusters": [int(k) for k in cfg.clusters],
            "cluster_sizes": [
                np.bincount(tree.labels[:, level], minlength=k).tolist()
                for level, k in enumerate(cfg.clusters)
            ],
            "n_tiles": int(len(x)),
            "n_slides": len(slides),
            "fingerprint": stamp,
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    write_clusters_csv(out / "clusters.csv", table)
    write_report(out / "report.html", cfg, table, tree.labels, weights, slides)
    write_weights(target, rows, attrs)  # last: its fingerprint marks the run complete
    level = len(cfg.clusters) - 1
    top_rows = [r for r in table if r["level"] == level]
    big = max(r["share_tiles"] for r in top_rows)
    print(
        f"curate: {len(x)} tiles of {len(slides)} slides in {len(top_rows)} top-level clusters "
        f"(largest {big:.1%} of the tiles, {1 / len(top_rows):.1%} after balancing) -> {target}"
    )
    return 0
