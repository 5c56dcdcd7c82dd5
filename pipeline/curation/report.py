"""What curation did: ``clusters.csv`` and ``report.html`` (cluster shares before and after
balancing, example tiles per top-level cluster; PNGs embedded as base64, one file)."""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import logging
from pathlib import Path

import numpy as np

from pipeline.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

FIELDS = ["level", "cluster", "parent", "tiles", "share_tiles", "share_weighted"]
THUMB = 96  # px per example tile in the report


def cluster_table(labels: np.ndarray, weights: np.ndarray) -> list[dict]:
    """One row per non-empty cluster of every level (``labels`` ``N x L``, level 0 finest):
    its parent one level up (-1 at the top), tiles, share of the tiles (before) and share
    of the weighted stream (after, the sum of its tiles' weights over all weights)."""
    labels = np.asarray(labels, np.int64)
    n, levels = labels.shape
    total = float(np.sum(weights))
    rows = []
    for level in range(levels):
        ids, first, counts = np.unique(labels[:, level], return_index=True, return_counts=True)
        mass = np.bincount(labels[:, level], weights=weights)[ids]  # clusters
        parent = labels[first, level + 1] if level + 1 < levels else np.full(len(ids), -1)
        for c, p, k, m in zip(ids, parent, counts, mass, strict=True):
            rows.append(
                {
                    "level": level,
                    "cluster": int(c),
                    "parent": int(p),
                    "tiles": int(k),
                    "share_tiles": k / n,
                    "share_weighted": m / total,
                }
            )
    return rows


def write_clusters_csv(path: Path, rows: list[dict]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    **r,
                    "share_tiles": f"{r['share_tiles']:.6g}",
                    "share_weighted": f"{r['share_weighted']:.6g}",
                }
            )
    return Path(path)


def _png(fig) -> str:
    """A matplotlib figure as a base64 PNG (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def shares_plot(top: list[dict]) -> str:
    """Bar plot of the top-level clusters' shares before and after balancing (base64 PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = sorted(top, key=lambda r: -r["share_tiles"])
    x = np.arange(len(top))
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(top) + 2), 3.5))
    ax.bar(x - 0.2, [r["share_tiles"] for r in top], 0.4, label="tiles (before)")
    ax.bar(x + 0.2, [r["share_weighted"] for r in top], 0.4, label="weighted stream (after)")
    ax.set_xticks(x, [str(r["cluster"]) for r in top], fontsize=7, rotation=90)
    ax.set_xlabel("top-level cluster (largest first)")
    ax.set_ylabel("share")
    ax.legend(frameon=False)
    return _png(fig)


def _tile_tables(cfg, slides: list) -> list:
    """Per slide a :class:`pipeline.wsi.coords.Coords` with the feature rows' coords, read
    from ``cfg.coords`` (matched by slide id) or else from the feature file itself."""
    from pipeline.wsi.coords import list_coords_files, read_coords

    by_id = {}
    if cfg.coords is not None:
        for path in list_coords_files(cfg.coords):
            table = read_coords(path)
            by_id[str(table.attrs.get("slide_id") or path.stem)] = table
    tables = []
    for sid, path, coords, _ in slides:
        table = by_id.get(sid) or read_coords(path)
        tables.append(dataclasses.replace(table, coords=coords, tissue_fraction=None))
    return tables


def example_strips(cfg, top: list[dict], labels: np.ndarray, slides: list) -> dict[int, str]:
    """``{top cluster: base64 PNG}`` of up to ``cfg.examples`` random tiles of each of the
    ``cfg.report_clusters`` largest top-level clusters ({} when tiles cannot be read)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from tqdm.auto import tqdm

    from pipeline.data.tiles import TileDataset

    if cfg.examples < 1 or cfg.report_clusters < 1:
        return {}
    try:
        tiles = TileDataset(_tile_tables(cfg, slides))
    except Exception as exc:  # the report still shows the shares without tiles
        log.warning("report without example tiles: %s", exc)
        return {}
    rng = np.random.default_rng(cfg.seed)
    shown = sorted(top, key=lambda r: -r["tiles"])[: cfg.report_clusters]
    strips = {}
    try:
        for r in tqdm(shown, desc="example tiles", disable=not cfg.progress):
            members = np.flatnonzero(labels[:, -1] == r["cluster"])
            pick = np.sort(rng.choice(members, min(cfg.examples, len(members)), replace=False))
            fig, axes = plt.subplots(1, cfg.examples, figsize=(cfg.examples * THUMB / 100, 1.0))
            for ax in np.atleast_1d(axes):
                ax.axis("off")
            for ax, i in zip(np.atleast_1d(axes), pick, strict=False):
                image = torch.from_numpy(tiles.read(int(i)))  # 3 x H x W uint8
                ax.imshow(image.permute(1, 2, 0).numpy())
            strips[r["cluster"]] = _png(fig)
    except Exception as exc:
        log.warning("report without example tiles: %s", exc)
        return {}
    finally:
        tiles.close()
    return strips


def write_report(
    path: Path, cfg, table: list[dict], labels: np.ndarray, weights: np.ndarray, slides: list
) -> Path:
    """``report.html``: the settings, the shares plot, a table and example tiles of the
    top-level clusters."""
    level = labels.shape[1] - 1
    top = [r for r in table if r["level"] == level]
    strips = example_strips(cfg, top, labels, slides)
    rows = "".join(
        f"<tr><td>{r['cluster']}</td><td>{r['tiles']}</td><td>{r['share_tiles']:.1%}</td>"
        f"<td>{r['share_weighted']:.1%}</td><td>"
        + (
            f"<img src='data:image/png;base64,{strips[r['cluster']]}'>"
            if r["cluster"] in strips
            else ""
        )
        + "</td></tr>"
        for r in sorted(top, key=lambda r: -r["tiles"])
    )
    facts = (
        f"{len(labels)} tiles of {len(slides)} slides; hierarchical k-means with "
        f"{list(cfg.clusters)} clusters per level (finest first), {len(top)} non-empty at the "
        "top. After balancing every top-level cluster has the same share of the weighted "
        "stream (Vo et al., 2024)"
        + (f"; groups from {cfg.groups} rescale it" if cfg.groups else "")
        + "."
    )
    body = f"""<!doctype html><html><head><meta charset='utf-8'><title>Curation</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;text-align:right}}
img{{max-width:100%}}</style></head><body>
<h1>Curation of pretraining tiles</h1><p>{html.escape(facts)}</p>
<h2>Top-level clusters: share of the tiles and of the weighted stream</h2>
<img src='data:image/png;base64,{shares_plot(top)}' alt='cluster shares'>
<h2>Top-level clusters</h2>
<table><tr><th>cluster</th><th>tiles</th><th>share before</th><th>share after</th>
<th>example tiles</th></tr>{rows}</table></body></html>
"""
    return atomic_write_text(path, body)
