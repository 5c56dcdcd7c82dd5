"""Drawing behind ``cpath heatmap`` (see :mod:`pipeline.mil.heatmap`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.stats import rankdata

from pipeline.errors import ConfigError, PipelineError
from pipeline.features import read_features
from pipeline.io import atomic_path
from pipeline.mil.heatmap import HeatmapConfig
from pipeline.mil.splits import read_splits
from pipeline.mil.training import MILModule
from pipeline.wsi.reader import Slide


def tile_scores(module: MILModule, features: np.ndarray) -> np.ndarray:
    """Per-tile attention (for the predicted class, where there is one per class) or
    instance score of the predicted class; ``N`` floats."""
    x = torch.from_numpy(np.asarray(features, np.float32))[None]  # 1 x N x D
    mask = torch.ones(x.shape[:2], dtype=torch.bool)
    module.eval()
    with torch.inference_mode():
        out = module(x, mask)
    pred = int(out["logits"][0].argmax()) if out["logits"].shape[1] > 1 else 0
    if "attention" in out:
        att = out["attention"][0]
        return (att[:, pred] if att.ndim == 2 else att).float().numpy()
    return torch.softmax(out["instance_scores"][0].float(), -1)[:, pred].numpy()


def draw_heatmap(cfg: HeatmapConfig) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if cfg.run is None or cfg.slide is None:
        raise ConfigError("heatmap needs --run RUN (from `cpath train-mil`) and --slide SLIDE_ID")
    run = Path(cfg.run)
    try:
        run_cfg = yaml.safe_load((run / "config.yaml").read_text())
    except OSError as exc:
        raise PipelineError(f"{run}: not a train-mil run ({exc})") from exc
    fold = cfg.fold
    if fold is None:  # the run's splits: a --splits file, else those it made
        splits = Path(run_cfg["splits"]) if run_cfg.get("splits") else run / "splits.csv"
        row = next((r for r in read_splits(splits) if r["slide_id"] == cfg.slide), None)
        if row is None:
            raise PipelineError(f"{cfg.slide}: not in {splits}")
        fold = next(int(k[5:]) for k, v in row.items() if k.startswith("fold_") and v == "test")
    ckpt = run / f"fold_{fold}" / "model.ckpt"
    if not ckpt.is_file():
        raise PipelineError(f"{ckpt}: no model; finish `cpath train-mil` first")
    module = MILModule.load_from_checkpoint(ckpt, map_location="cpu")
    feats, coords, attrs = read_features(Path(run_cfg["features"]) / f"{cfg.slide}.h5")
    scores = tile_scores(module, feats)
    percentile = (rankdata(scores) - 1) / max(len(scores) - 1, 1)  # 0 (lowest) .. 1 (highest)

    slide = Slide(attrs["slide_path"])
    thumb = slide.thumbnail_at_mpp(cfg.thumbnail_mpp)
    scale = slide.mpp / cfg.thumbnail_mpp  # thumbnail px per level-0 px
    size0 = int(attrs["patch_size_level0"])
    heat = np.full(thumb.shape[:2], np.nan, np.float32)
    for (x, y), p in zip(coords, percentile, strict=True):
        x0, y0 = int(x * scale), int(y * scale)
        x1, y1 = max(x0 + 1, int((x + size0) * scale)), max(y0 + 1, int((y + size0) * scale))
        heat[y0:y1, x0:x1] = np.fmax(heat[y0:y1, x0:x1], p)
    fig, ax = plt.subplots(figsize=(8, 8 * thumb.shape[0] / max(thumb.shape[1], 1)))
    ax.imshow(thumb)
    shown = ax.imshow(np.ma.masked_invalid(heat), cmap="jet", alpha=cfg.alpha, vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, fraction=0.04, label="attention (percentile within the slide)")
    ax.set_title(f"{cfg.slide}: {run_cfg.get('model')} attention, fold {fold}")
    ax.axis("off")
    out = Path(cfg.out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    k = min(cfg.top_k, len(scores))
    top = np.argsort(-scores)[:k]
    patch = int(attrs["patch_size"])
    tiles = [
        slide.read_tile_chw((int(coords[i][0]), int(coords[i][1])), (size0, size0), (patch, patch))
        for i in top
    ]
    strip = (
        np.concatenate([t.transpose(1, 2, 0) for t in tiles], axis=1)
        if tiles
        else np.zeros((1, 1, 3), np.uint8)
    )
    top_path = out.with_name(f"{out.stem}_top.png")
    from PIL import Image

    with atomic_path(top_path) as tmp:
        Image.fromarray(strip).save(tmp, format="PNG")
    slide.close()
    return [out, top_path]
