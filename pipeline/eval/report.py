"""Outputs of ``cpath evaluate``: ``results.json``, ``leaderboard.csv`` (encoders x task
columns and the mean rank, as pathology foundation-model papers report it, plus each
tile task's PathoROB robustness index, which is not ranked), ``report.md`` and
``report.html`` (tables plus the figures of each task). A slide task with tile labels
has a ``<model>_localization`` column (attention localization AUC), ranked like the
others."""

from __future__ import annotations

import csv
import html
import json
import os
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from pipeline.io import atomic_path, atomic_write_text


def _plain(value):
    """JSON-ready: numpy scalars and arrays to Python, NaN to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _finite(values: dict) -> bool:
    return all(v is not None and np.isfinite(v) for v in values.values())


def leaderboard(results: dict) -> tuple[list[str], list[dict]]:
    """``(columns, rows)``: one row per encoder with each task column's value, its rank
    (1 = best, ties share the mean rank) and the mean rank over the columns; then each
    tile task's robustness index (``TASK/robustness_index``), shown but not ranked: it
    measures robustness to sites, not performance."""
    encoders = list(results["encoders"])
    columns, values, unranked = [], {}, []
    for task, r in results["tasks"].items():
        if r.get("status") != "ok":
            continue
        for col in r["columns"]:
            got = {e: (r["scores"][col].get(e) or {}).get("value") for e in encoders}
            if _finite(got):
                columns.append(f"{task}/{col}")
                values[columns[-1]] = got
        rob = r.get("robustness") or {}
        got = {e: ((rob.get(e) or {}).get("robustness_index") or {}).get("value") for e in encoders}
        if rob and _finite(got):
            unranked.append(f"{task}/robustness_index")
            values[unranked[-1]] = got
    weights = results.get("weights") or {}
    rows = [{"encoder": e, "weights": weights.get(e, "")} for e in encoders]
    ranks = {e: [] for e in encoders}
    for col in columns:
        order = rankdata([-values[col][e] for e in encoders], method="average")
        for row, e, rank in zip(rows, encoders, order, strict=True):
            row[col] = values[col][e]
            ranks[e].append(float(rank))
    for row in rows:
        row["mean_rank"] = float(np.mean(ranks[row["encoder"]])) if columns else None
        row.update({col: values[col][row["encoder"]] for col in unranked})
    rows.sort(key=lambda r: (r["mean_rank"] is None, r["mean_rank"]))
    return columns + unranked, rows


def _board_name(row: dict) -> str:
    return f"{row['encoder']} (random init)" if row.get("weights") == "random" else row["encoder"]


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _ci(entry: dict) -> str:
    lo, hi = entry.get("ci") or (None, None)
    return f"{_fmt(entry.get('value'))} [{_fmt(lo)}, {_fmt(hi)}]"


def _task_tables(name: str, r: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) tables of one finished task."""
    tables = []
    header = ["encoder"] + [
        f"{meta.get('title', col)} ({meta['metric']}, 95% CI)" for col, meta in r["columns"].items()
    ]
    encoders = list(next(iter(r["scores"].values()))) if r["scores"] else []
    rows = [[e] + [_ci(r["scores"][col].get(e, {})) for col in r["columns"]] for e in encoders]
    tables.append((f"{name}", header, rows))
    comparisons = [
        [
            col,
            c["a"],
            c["b"],
            _fmt(c["difference"]),
            f"[{_fmt(c['ci'][0])}, {_fmt(c['ci'][1])}]",
            _fmt(c["p_value"]),
        ]
        for col, cs in r.get("comparisons", {}).items()
        for c in cs
    ]
    if comparisons:
        tables.append(
            (
                f"{name}: paired bootstrap (a - b)",
                ["column", "a", "b", "difference", "95% CI", "p"],
                comparisons,
            )
        )
    if r.get("fewshot"):
        ks = sorted({int(k) for v in r["fewshot"].values() for k in v})
        rows = [
            [e] + [f"{v[k]['mean']:.3f} +- {v[k]['std']:.3f}" if k in v else "n/a" for k in ks]
            for e, v in ((e, {int(k): x for k, x in v.items()}) for e, v in r["fewshot"].items())
        ]
        tables.append(
            (
                f"{name}: few-shot balanced accuracy (mean +- std over episodes)",
                ["encoder"] + [f"k={k}" for k in ks],
                rows,
            )
        )
    if r.get("robustness"):
        rows = []
        for e, rob in r["robustness"].items():
            leak, shift = rob.get("leakage") or {}, rob.get("stain_shift") or {}
            ri = rob.get("robustness_index") or {}
            knn = rob.get("slide_knn") or {}
            rows.append(
                [
                    e,
                    f"{_fmt(leak.get('balanced_accuracy'))} (chance {_fmt(leak.get('chance'))}, "
                    f"silhouette {_fmt(leak.get('silhouette'))}; {leak.get('sites')} sites, "
                    f"{leak.get('groups')} {leak.get('grouped_by')}s)"
                    if "balanced_accuracy" in leak
                    else f"n/a ({leak.get('skipped', 'not run')})",
                    f"{_fmt(ri.get('value'))} (k={ri.get('k')}, across {ri.get('confounder')}s)"
                    if "value" in ri
                    else f"n/a ({ri.get('skipped', 'not run')})",
                    f"{_fmt(knn.get('accuracy'))} (chance {_fmt(knn.get('chance'))}, "
                    f"{knn.get('slides')} slides)"
                    if "accuracy" in knn
                    else f"n/a ({knn.get('skipped', 'not run')})",
                    _fmt(shift.get("clean")),
                    _fmt(shift.get("shifted")),
                    _fmt(shift.get("drop")),
                ]
            )
        tables.append(
            (
                f"{name}: robustness",
                [
                    "encoder",
                    "site predicted on held-out slides (balanced accuracy)",
                    "PathoROB robustness index",
                    "slide-ID kNN (WSI collapse)",
                    "linear clean",
                    "linear stain-shifted",
                    "drop",
                ],
                rows,
            )
        )
    if (r.get("resolution") or {}).get("encoders"):
        res = r["resolution"]
        rows = [
            [e, v["model"], _fmt(v["recommended_mpp"]), _fmt(v["effective_mpp"])]
            for e, v in res["encoders"].items()
        ]
        title = f"{name}: resolution (data at {_fmt(res['mpp'])} um/px)"
        tables.append(
            (title, ["encoder", "model", "recommended mpp", "mpp seen (images resized)"], rows)
        )
    return tables


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Html(str):
    """Markup that a table cell takes as it is (everything else is escaped)."""


def _cell(c) -> str:
    return c if isinstance(c, Html) else html.escape(str(c))


def _html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em}td,th{border:1px solid #ccc;padding:.25em .6em;
font-size:.9em;text-align:left}th{background:#f3f3f3}img{max-width:100%;margin:.3em .3em .3em 0;
border:1px solid #eee}.failed{color:#a00}figure{display:inline-block;margin:0}"""
# Counts the figures that loaded: a headless browser reads it from the rendered DOM.
LOAD_CHECK = """<script>window.addEventListener('load',function(){var im=document.images,ok=0;
for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0){ok++;}}
document.body.setAttribute('data-images-loaded',ok+'/'+im.length);});</script>"""


ROBUSTNESS_NOTE = (
    "robustness_index: PathoROB robustness index (Kömen et al., 2025): the share "
    "of same-class neighbours from other sites (or slides) among same-class-other-"
    "site and other-class-same-site neighbours; 1 = neighbours follow biology, "
    "0 = they follow the site. Not in the mean rank."
)


LOCALIZATION_NOTE = (
    "localization AUC: per test slide with positive (e.g. tumour) and negative labelled "
    "tiles, the ROC AUC of the slide model's attention (or instance scores) against the "
    "tile labels, averaged over seeds, then the mean over slides (95% CI resampling "
    "patients). Ranked like the other columns."
)


def _column_titles(results: dict) -> dict[str, str]:
    """Leaderboard headers of the columns that carry a title (``task: title``); the others
    are shown as ``task/column``."""
    return {
        f"{task}/{col}": f"{task}: {meta['title']}"
        for task, r in results["tasks"].items()
        if r.get("status") == "ok"
        for col, meta in r["columns"].items()
        if meta.get("title")
    }


def _facts(r: dict) -> str:
    """One line on what a finished task was scored on."""
    if r.get("kind") == "slide" and r.get("split"):
        seeds = len(r.get("seeds") or [0])
        if r["split"] == "fixed":
            facts = (
                f"{r['n_items']} test slides of {r['n_patients']} patients; fixed split (the "
                f"labels' split column): one model per seed trained on {r['n_train']} slides"
                + (f" ({r['n_val']} more for validation)" if r.get("n_val") else "")
                + f", {seeds} seeds"
            )
        else:
            facts = (
                f"{r['n_items']} slides of {r['n_patients']} patients; {r['folds']}-fold "
                f"cross-validation by patient, {seeds} seeds"
            )
        for col, meta in r["columns"].items():
            if meta.get("metric") == "localization_auc":
                n = {e: v.get("n_slides") for e, v in r["scores"][col].items()}
                facts += (
                    f"; {meta.get('title', col)}: attention against the tile labels in "
                    f"{meta.get('tile_labels')}, on {max(n.values())} slides with positive "
                    "and negative tiles"
                )
        return facts
    facts = f"{r.get('n_items')} items" + (
        f" from {r['n_slides']} slides" if r.get("n_slides") else ""
    )
    if r.get("grouped_by") == "patient":
        facts += f" of {r['n_groups']} patients (folds keep each patient on one side)"
    res = r.get("resolution")
    if res:
        mpp = "mixed" if res["mpp"] is None else f"{res['mpp']}"
        approx = " (approximate)" if res.get("mpp_approximate") else ""
        facts += f"; {res['dataset']} images of {res['image_px'][0]} x {res['image_px'][1]} px"
        facts += f" at {mpp} um/px{approx}"
    return facts


def write_outputs(results: dict, out: Path) -> None:
    """``results.json``, ``leaderboard.csv``, ``report.md`` and ``report.html`` in ``out``."""
    from pipeline.eval.benchmark_data import data_resolution

    for r in results["tasks"].values():  # prepared public benchmarks: their mpp per encoder
        if r.get("kind") == "tile" and r.get("status") == "ok" and "resolution" not in r:
            resolution = data_resolution(r.get("data"), results["encoders"])
            if resolution is not None:
                r["resolution"] = resolution
    results = _plain(results)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    columns, rows = leaderboard(results)
    with atomic_path(out / "leaderboard.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["encoder", "weights", *columns, "mean_rank"])
        writer.writeheader()
        writer.writerows(rows)
    titles = _column_titles(results)
    board = (
        ["encoder", *(titles.get(c, c) for c in columns), "mean rank"],
        [[_board_name(r), *(_fmt(r[c]) for c in columns), _fmt(r["mean_rank"], 2)] for r in rows],
    )
    encoders = ", ".join(f"{k} = {v}" for k, v in results["encoders"].items())
    if any(r["weights"] == "random" for r in rows):
        encoders += " (random init: a baseline, not a pretrained encoder)"
    md = [
        "# Encoder evaluation",
        "",
        f"Encoders: {encoders}",
        "",
        "## Leaderboard",
        "",
        _md_table(*board),
        "",
    ]
    parts = [
        f"<h1>Encoder evaluation</h1><p>Encoders: {html.escape(encoders)}</p>",
        "<h2>Leaderboard</h2>",
        _html_table(*board),
    ]
    if any(c.endswith("/robustness_index") for c in columns):
        md += [ROBUSTNESS_NOTE, ""]
        parts.append(f"<p>{html.escape(ROBUSTNESS_NOTE)}</p>")
    if any(c.endswith("_localization") and c in titles for c in columns):
        md += [LOCALIZATION_NOTE, ""]
        parts.append(f"<p>{html.escape(LOCALIZATION_NOTE)}</p>")
    for name, r in results["tasks"].items():
        md += [f"## {name} ({r.get('kind')})", ""]
        parts.append(f"<h2>{html.escape(name)} ({html.escape(str(r.get('kind')))})</h2>")
        if r.get("status") != "ok":
            md += [f"**Failed**: {r.get('error')}", ""]
            parts.append(f"<p class='failed'><b>Failed</b>: {html.escape(str(r.get('error')))}</p>")
            continue
        facts = _facts(r)
        md += [facts, ""]
        parts.append(f"<p>{html.escape(facts)}</p>")
        for title, header, trows in _task_tables(name, r):
            md += [f"### {title}", "", _md_table(header, trows), ""]
            parts += [f"<h3>{html.escape(title)}</h3>", _html_table(header, trows)]
        for key, figure in r.get("figures", {}).items():
            rel = os.path.relpath(figure, out)
            md += [f"![{key}]({rel})", ""]
            parts.append(
                f"<figure><img src='{html.escape(rel)}' alt='{html.escape(key)}'></figure>"
            )
    atomic_write_text(out / "report.md", "\n".join(md))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Encoder evaluation</title>"
        f"<style>{STYLE}</style>{LOAD_CHECK}</head><body>{''.join(parts)}</body></html>"
    )
    atomic_write_text(out / "report.html", page)
