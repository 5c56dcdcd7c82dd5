"""``RUNS/report.html`` of the demo: one page linking every stage's outputs."""

from __future__ import annotations

import csv
import html
import json
import os
from pathlib import Path

from pipeline.eval.report import LOAD_CHECK, STYLE, Html, _html_table
from pipeline.io import atomic_write_text


def pretraining_curves(run: Path, out: Path) -> Path | None:
    """Loss, RankMe and learning rate of a pretraining run against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.ssl.train import read_metrics

    rows = read_metrics(run)
    if not rows:
        return None
    panels = [
        k
        for k in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "rankme", "lr")
        if any(k in r for r in rows)
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set(title=key, xlabel="step")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _number(cell: str) -> str:
    """A leaderboard cell: numbers to 3 decimals, names and empty cells as they are."""
    try:
        return f"{float(cell):.3f}"
    except ValueError:
        return cell


def _img(path: Path, root: Path, caption: str = "", width: int | None = None) -> str:
    rel = html.escape(os.path.relpath(path, root))
    style = f" style='width:{width}px'" if width else ""
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (
        f"<figure><img src='{rel}' alt='{html.escape(caption or path.name)}'{style}>{cap}</figure>"
    )


def _link(path: Path, root: Path, text: str | None = None) -> Html:
    rel = html.escape(os.path.relpath(path, root))
    return Html(f"<a href='{rel}'>{html.escape(text or rel)}</a>")


def write_report(demo) -> Path:
    """Write the page for a finished :class:`pipeline.demo.Demo` run; returns its path."""
    root = demo.runs
    data = Path(demo.cfg.data)
    with open(data / "labels.csv", newline="") as f:
        labels = list(csv.DictReader(f))
    tumour = [r["slide_id"] for r in labels if r["label"] == "tumor"]
    normal = [r["slide_id"] for r in labels if r["label"] != "tumor"]
    parts = [
        "<h1>Demo run</h1>",
        f"<p>{len(labels)} slides ({len(tumour)} tumour, {len(normal)} normal) of "
        f"{len({r['case_id'] for r in labels})} patients from {len({r.get('site') for r in labels})} "
        f"staining sites: {_link(data / 'slides', root, 'slides')}, "
        f"{_link(data / 'labels.csv', root, 'labels.csv')}, "
        f"{_link(data / 'ground_truth', root, 'ground-truth masks')}.</p>",
    ]
    held = data / "labels_heldout.csv"
    if held.is_file():
        with open(held, newline="") as f:
            test = [r for r in csv.DictReader(f) if r["split"] == "test"]
        parts.append(
            f"<p>Held-out cohort: {len(test)} slides of "
            f"{len({r['case_id'] for r in test})} other patients from sites "
            f"{', '.join(sorted({r['site'] for r in test}))}, quilted only from regions of the "
            f"source images that no development slide uses "
            f"({_link(held, root, 'labels_heldout.csv')}).</p>"
        )

    prep = demo.summary.get("preprocess", {})
    parts += [
        "<h2>1. Tissue detection and tiling</h2>",
        f"<p>{prep.get('tiles', '?')} tiles of {prep.get('tile_size', '?')} px at "
        f"{prep.get('mpp', '?')} um/px; tissue outline and tile grid on each slide "
        f"({_link(demo.prep / 'manifest.csv', root, 'manifest')}, "
        f"{_link(demo.prep / 'thumbnails', root, 'all thumbnails')}).</p>",
    ]
    parts += [
        _img(demo.prep / "thumbnails" / f"{s}.jpg", root, s, 260) for s in tumour[:2] + normal[:2]
    ]

    stain = json.loads((demo.stain_dir / "report.json").read_text())
    before, after = stain["before"], stain["after"]
    parts += [
        "<h2>2. Stain normalization</h2>",
        f"<p>Macenko fitted to the reference tile {html.escape(stain['reference'])} "
        f"({_link(demo.stain_dir / 'stain.json', root, 'stain.json')}). Top: one tile per slide "
        "as scanned; bottom: normalized. A probe that tells the slide from a tile's colour "
        f"statistics scores {before['slide_probe_accuracy']:.2f} before and "
        f"{after['slide_probe_accuracy']:.2f} after (chance {before['chance']:.2f}). "
        "Pretraining used stain augmentation (HED and HSV jitter).</p>",
        _img(demo.stain_dir / "reference.png", root, "reference", 128),
        _img(demo.stain_dir / "before_after.png", root, "before / after"),
    ]

    curves = pretraining_curves(demo.pretrain_dir, root / "figures" / "pretraining.png")
    parts += [
        "<h2>3. Self-supervised pretraining</h2>",
        f"<p>DINOv2-style tiny preset ({_link(demo.pretrain_dir / 'config.yaml', root, 'config')}, "
        f"{_link(demo.encoder, root, 'exported encoder')}).</p>",
    ]
    if curves:
        parts.append(_img(curves, root, "pretraining curves"))

    parts += [
        "<h2>4. Slide-level MIL (ABMIL, 5 folds grouped by patient of the development cohort)</h2>"
    ]
    rows = []
    for name in ("pretrained", "random", "survival"):
        path = demo.mil / name / "metrics.json"
        if path.is_file():
            pooled = json.loads(path.read_text())["pooled"]
            text = ", ".join(
                f"{k} {v['value']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"
                for k, v in pooled.items()
                if v["value"] is not None
            )
            rows.append([name, text, _link(demo.mil / name, root)])
    parts.append(_html_table(["run", "pooled out-of-fold metrics (95% CI)", "folder"], rows))

    parts += [
        "<h2>5. Attention heatmaps</h2><p>ABMIL on the pretrained features (each slide scored "
        "by the fold that held it out), next to the ground-truth tumour mask.</p>"
    ]
    for png in sorted(demo.heatmaps.glob("*.png")):
        if png.stem.endswith("_top"):
            continue
        parts.append(
            "<div>"
            + _img(png, root, f"{png.stem}: attention", 420)
            + _img(data / "ground_truth" / f"{png.stem}_tumor.png", root, "ground truth", 200)
            + _img(png.with_name(f"{png.stem}_top.png"), root, "top tiles", 420)
            + "</div>"
        )

    parts += [
        "<h2>6. Encoder evaluation</h2>",
        f"<p>Pretrained against the same architecture at random init "
        f"({_link(demo.eval / 'report.html', root, 'full report')}, "
        f"{_link(demo.eval / 'results.json', root, 'results.json')}).</p>",
    ]
    with open(demo.eval / "leaderboard.csv", newline="") as f:
        board = list(csv.reader(f))
    parts.append(
        _html_table(
            board[0],
            [[_number(c) for c in r] for r in board[1:]],
        )
    )
    from pipeline.demo import headline_rows

    rows = headline_rows(demo.summary.get("evaluate") or {})
    if rows:
        parts.append(
            "<p>Development rows: cross-validated by patient inside the development cohort, "
            "whose tissue pretraining also saw. Held-out rows: trained on the whole development "
            "cohort, scored on the held-out cohort (other patients and sites), quilted from "
            "regions of every source image that neither pretraining nor training saw. Folds by "
            "patient also test images of a class that no training patient had, so the "
            "cross-validated figure can be the lower one (README, 'The demo').</p>"
        )
        parts.append(
            _html_table(
                ["figure", "scored on", "pretrained", "random init", "paired bootstrap p"], rows
            )
        )
    for name in (
        "tissue-tiles-heldout_linear_confusion",
        "tissue-tiles-heldout_fewshot",
        "tumour-slides-heldout_roc",
        "tissue-tiles_embedding",
    ):
        figure = demo.eval / "figures" / f"{name}.png"
        if figure.is_file():
            parts.append(_img(figure, root, name, 420))

    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>Demo run</title>"
        f"<style>{STYLE}</style>{LOAD_CHECK}</head><body>{''.join(parts)}</body></html>"
    )
    path = root / "report.html"
    atomic_write_text(path, page)
    return path
