"""``cpath train-slide-encoder``: a COBRA slide encoder trained without labels (Lenz et al.,
CVPR 2025), by contrasting two views of a case made from different foundation models' tile
features with the MoCo v3 loss (:mod:`pipeline.slide.cobra`).

    cpath train-slide-encoder --features '[uni=runs/feats/uni, conch=runs/feats/conch]' \\
        --cases cases.csv --out runs/cobra

Each ``--features NAME=DIR`` is a folder of ``cpath extract`` (one ``<slide_id>.h5`` a slide,
features N x D + level-0 coords); the same slide id in several folders is the same slide seen
by several models (or magnifications). A view is one (model, slide) of a case, with a random
share of its tiles (``min_keep`` ... 1, at most ``tiles_per_view``) in y-then-x order; the two
views of a case come from two different feature files when the case has more than one. Cases
are slide ids, or the ``case_id`` of ``--cases`` (CSV ``slide_id,case_id``).

Writes under ``out``: ``encoder.safetensors`` + ``encoder.json`` (the online encoder, its
inputs and hyperparameters), ``metrics.csv`` (loss per epoch), ``checkpoint.pt`` (every
``checkpoint_every`` epochs; a rerun with the same inputs and settings, the epochs aside,
continues from it) and ``config.yaml``. A rerun whose ``encoder.json`` matches the inputs
and settings skips. ``--features+ NAME=DIR`` (repeated) adds one folder at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

#: settings that change the trained encoder (the others only change how it is computed)
TRAIN_KEYS = (
    "width",
    "layers",
    "heads",
    "att_dim",
    "d_state",
    "proj_dim",
    "dropout",
    "predictor",
    "tiles_per_view",
    "min_keep",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "tau",
    "momentum",
    "seed",
)


@dataclass
class TrainSlideEncoderConfig:
    """Self-supervised COBRA slide encoder from several foundation models' tile features.

    Args:
        features: ``NAME=DIR`` per foundation model (or magnification): folders of
            ``cpath extract``'s per-slide .h5 files; slides matched across folders by file
            name. At least one; two or more give the cross-model views COBRA learns from.
        cases: optional CSV ``slide_id,case_id``: slides of one case are views of each
            other; default each slide its own case.
        width: common width E of the embedded tiles (COBRA: 768).
        layers: sequence blocks (COBRA: 2 Mamba-2 layers).
        heads: gated-attention heads (COBRA: 8); ``width`` must be a multiple.
        att_dim: hidden width of each attention head (COBRA: 96).
        d_state: state size of the sequence blocks (COBRA: 128 with Mamba-2).
        proj_dim: width of the contrastive space (COBRA: 256).
        dropout: dropout of the online encoder and predictor (COBRA: 0.25).
        predictor: MoCo v3's predictor MLP on the online branch (COBRA: yes). Without it the
            queries are the online projections (MoCo v2-style), which learns much faster in
            short runs and small cohorts.
        block: sequence block: ``ssm`` (pure torch), ``mamba2`` (``mamba_ssm``, GPU only) or
            ``auto`` (mamba2 when it can run, else ssm).
        tiles_per_view: most tiles in one view (COBRA: 1024).
        min_keep: each view keeps a random share in [min_keep, 1] of the slide's tiles.
        epochs: passes over the cases.
        batch_size: cases per step (at least 2; the other cases are the negatives).
        lr: peak learning rate of AdamW (linear warm-up, then half-cosine decay).
        weight_decay: AdamW weight decay (COBRA: 0.1).
        warmup_epochs: epochs of linear learning-rate warm-up.
        tau: temperature of the MoCo v3 loss (COBRA: 0.2).
        momentum: base momentum of the key encoder, raised to 1 by a half-cosine (0.99).
        checkpoint_every: epochs between checkpoints (0: none).
        seed: seed of the initialisation and the views.
        device: auto (a GPU when torch sees one, else the CPU), cpu, cuda or cuda:N.
        out: output folder.
    """

    features: list[str] = field(default_factory=list)
    cases: Path | None = None
    width: int = 256
    layers: int = 2
    heads: int = 8
    att_dim: int = 96
    d_state: int = 16
    proj_dim: int = 256
    dropout: float = 0.25
    predictor: bool = True
    block: Literal["auto", "ssm", "mamba2"] = "auto"
    tiles_per_view: int = 1024
    min_keep: float = 0.5
    epochs: int = 100
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_epochs: int = 10
    tau: float = 0.2
    momentum: float = 0.99
    checkpoint_every: int = 10
    seed: int = 0
    device: str = "auto"
    out: Path = Path("runs/cobra")


@dataclass
class SlideFeatures:
    """One model's tile features of one slide: a feature file, or arrays held in memory."""

    model: str
    slide_id: str
    path: Path | None = None
    feats: np.ndarray | None = None  # N x D
    coords: np.ndarray | None = None  # N x 2, level-0 (x, y)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """``(features N x D float32, coords N x 2)`` in y-then-x order."""
        from pipeline.features import read_features
        from pipeline.slide.cobra import sort_yx

        if self.feats is not None:
            feats, coords = self.feats, self.coords
        else:
            feats, coords, _ = read_features(self.path)
        if coords is None or len(coords) != len(feats):
            coords = np.stack([np.arange(len(feats)), np.zeros(len(feats))], 1)
        order = sort_yx(coords)
        return np.asarray(feats, np.float32)[order], np.asarray(coords)[order]


def parse_features(specs: list[str]) -> dict[str, Path]:
    """``["NAME=DIR", ...]`` -> ``{NAME: DIR}``, checked."""
    from pipeline.errors import ConfigError

    if not specs:
        raise ConfigError(
            "--features is required: NAME=DIR per foundation model, e.g. "
            "--features '[uni=feats/uni, conch=feats/conch]'"
        )
    out: dict[str, Path] = {}
    for spec in specs:
        name, eq, folder = str(spec).partition("=")
        name = name.strip()
        if not eq or not name or not folder.strip():
            raise ConfigError(f"--features {spec!r}: write NAME=DIR (e.g. uni=runs/feats/uni)")
        if name in out:
            raise ConfigError(f"--features: the name {name!r} is given twice; names must differ")
        out[name] = Path(folder.strip())
    return out


def read_cases(path: Path | None, slide_ids: set[str]) -> dict[str, str]:
    """slide_id -> case_id from ``path`` (CSV slide_id,case_id); slides not in it (or no
    file) are their own case."""
    from pipeline.io import read_slide_column

    cases = {s: s for s in slide_ids}
    if path is not None:
        table = read_slide_column(path, "case_id", "case table")
        cases.update({s: c for s, c in table.items() if s in cases})
    return cases


def collect(cfg: TrainSlideEncoderConfig) -> tuple[dict[str, int], dict, list[list[SlideFeatures]]]:
    """Input widths by model name, each model's first-file attributes, and the cases (lists
    of :class:`SlideFeatures`) of ``cfg``'s feature folders."""
    import h5py

    from pipeline.errors import PipelineError
    from pipeline.features import read_features
    from pipeline.slide.embed import feature_files

    dims: dict[str, int] = {}
    attrs: dict[str, dict] = {}
    entries: list[SlideFeatures] = []
    for name, folder in parse_features(cfg.features).items():
        for path in feature_files(folder):
            try:
                with h5py.File(path, "r") as f:
                    shape = f["features"].shape
            except (OSError, KeyError) as exc:
                raise PipelineError(f"{path}: cannot read the feature file ({exc})") from exc
            if len(shape) != 2 or shape[0] == 0:
                raise PipelineError(
                    f"{path}: features of shape {shape}, expected N x D with N > 0; "
                    "drop empty slides from the folder"
                )
            if name not in dims:
                dims[name] = shape[1]
                attrs[name] = read_features(path)[2]
            elif shape[1] != dims[name]:
                raise PipelineError(
                    f"{path}: {shape[1]} features a tile, other files of {name}={folder} have "
                    f"{dims[name]}; one folder must hold one model's features"
                )
            entries.append(SlideFeatures(name, path.stem, path))
    cases = read_cases(cfg.cases, {e.slide_id for e in entries})
    grouped: dict[str, list[SlideFeatures]] = {}
    for e in entries:
        grouped.setdefault(cases[e.slide_id], []).append(e)
    return dims, attrs, [grouped[c] for c in sorted(grouped)]


def sample_view(
    feats: np.ndarray, rng: np.random.Generator, tiles_per_view: int, min_keep: float
) -> np.ndarray:
    """A random share in [min_keep, 1] of the tiles (at most ``tiles_per_view``), kept in
    their order. ``feats``: N x D -> n x D."""
    n = len(feats)
    keep = max(1, min(tiles_per_view, round(n * rng.uniform(min_keep, 1.0))))
    return feats[np.sort(rng.choice(n, keep, replace=False))]


def schedules(cfg: TrainSlideEncoderConfig, steps_per_epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-step learning rate (linear warm-up, half-cosine decay) and key-encoder momentum
    (half-cosine from ``momentum`` to 1), as MoCo v3 and COBRA."""
    t = np.arange(cfg.epochs * steps_per_epoch) / steps_per_epoch  # epoch, fractional
    warm = max(cfg.warmup_epochs, 0)
    decay = cfg.lr * 0.5 * (1 + np.cos(np.pi * (t - warm) / max(cfg.epochs - warm, 1e-8)))
    lr = np.where(t < warm, cfg.lr * t / max(warm, 1e-8), decay)
    m = 1 - 0.5 * (1 + np.cos(np.pi * t / cfg.epochs)) * (1 - cfg.momentum)
    return lr, m


def build_encoder(cfg: TrainSlideEncoderConfig, dims: dict[str, int], block: str):
    from pipeline.slide.cobra import Cobra

    return Cobra(
        dims,
        width=cfg.width,
        layers=cfg.layers,
        heads=cfg.heads,
        att_dim=cfg.att_dim,
        d_state=cfg.d_state,
        proj_dim=cfg.proj_dim,
        dropout=cfg.dropout,
        block=block,
    )


def resolve_block(block: str) -> str:
    from pipeline.errors import ConfigError
    from pipeline.slide.cobra import mamba_available

    if block == "auto":
        return "mamba2" if mamba_available() else "ssm"
    if block == "mamba2" and not mamba_available():
        raise ConfigError(
            "--block mamba2 needs mamba_ssm and a GPU; install mamba-ssm on a GPU machine or "
            "use --block ssm"
        )
    return block


def train(
    cfg: TrainSlideEncoderConfig,
    dims: dict[str, int],
    cases: list[list[SlideFeatures]],
    block: str = "ssm",
    checkpoint: Path | None = None,
    fingerprint: str = "",
):
    """Train a COBRA encoder on ``cases`` (lists of one case's :class:`SlideFeatures`);
    returns the online :class:`~pipeline.slide.cobra.Cobra` (in eval mode, on the CPU)
    and the mean loss of every epoch. With ``checkpoint``, resumes from it when its
    fingerprint matches (``fingerprint``: of the inputs and settings but the epochs, so a
    rerun with more epochs continues, its schedules stretched to the new length) and saves it
    every ``cfg.checkpoint_every`` epochs and at the end."""
    import torch
    from tqdm import tqdm

    from pipeline.errors import PipelineError
    from pipeline.io import atomic_path
    from pipeline.slide.cobra import MoCoCobra
    from pipeline.slide.embed import resolve_device

    if cfg.batch_size < 2:
        raise PipelineError(f"--batch_size {cfg.batch_size}: MoCo v3 needs at least 2 cases")
    if len(cases) < 2:
        raise PipelineError(
            f"{len(cases)} case(s): contrastive training needs at least 2; add slides"
        )
    batch = min(cfg.batch_size, len(cases))
    steps_per_epoch = len(cases) // batch
    lrs, moms = schedules(cfg, steps_per_epoch)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = MoCoCobra(
        build_encoder(cfg, dims, block), tau=cfg.tau, dropout=cfg.dropout, predictor=cfg.predictor
    )
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    start, losses = 0, []
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if state.get("fingerprint") == fingerprint and state["epoch"] <= cfg.epochs:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            rng.bit_generator.state = state["rng"]
            torch.set_rng_state(state["torch_rng"])
            start, losses = state["epoch"], state["losses"]
            log.info("resuming from %s at epoch %d", checkpoint, start)
        else:
            log.info("%s is from other inputs or settings; starting afresh", checkpoint)
    model.train()
    step = start * steps_per_epoch
    bar = tqdm(range(start, cfg.epochs), desc="train-slide-encoder", unit="epoch")
    for epoch in bar:
        order = rng.permutation(len(cases))
        total = 0.0
        for b in range(steps_per_epoch):
            views1, views2 = [], []
            for c in order[b * batch : (b + 1) * batch]:
                entries = cases[c]
                pick = rng.choice(len(entries), 2, replace=len(entries) < 2)
                for views, k in ((views1, pick[0]), (views2, pick[1])):
                    feats, _ = entries[k].load()  # N x D, y-then-x order
                    x = sample_view(feats, rng, cfg.tiles_per_view, cfg.min_keep)  # n x D
                    views.append((entries[k].model, torch.from_numpy(x).to(device)))
            for group in optimizer.param_groups:
                group["lr"] = float(lrs[step])
            loss = model(views1, views2, float(moms[step]))
            if not math.isfinite(loss.item()):
                raise PipelineError(
                    f"non-finite loss at epoch {epoch + 1}; lower --lr or check the features "
                    "for NaN or huge values"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
            step += 1
        losses.append(total / steps_per_epoch)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        done = epoch + 1
        every = cfg.checkpoint_every
        if checkpoint is not None and every > 0 and (done % every == 0 or done == cfg.epochs):
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "epoch": done,
                "losses": losses,
                "fingerprint": fingerprint,
            }
            with atomic_path(checkpoint) as tmp:
                torch.save(state, tmp)
    encoder = model.online.to("cpu").eval()
    return encoder, losses


def train_fingerprint(
    cfg: TrainSlideEncoderConfig,
    cases: list[list[SlideFeatures]],
    block: str,
    keys: tuple[str, ...] = TRAIN_KEYS,
) -> str:
    """A hash of the feature files' names, sizes and times, the case grouping, the block and
    the settings ``keys``."""
    stamp = sorted(
        (e.model, e.slide_id, e.path.stat().st_size, e.path.stat().st_mtime_ns)
        for case in cases
        for e in case
    )
    grouping = sorted(sorted(e.slide_id for e in case) for case in cases)
    settings = {k: getattr(cfg, k) for k in keys}
    blob = json.dumps([stamp, grouping, settings, block], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


ENCODER_INFO = ("encoder", "encoder_sha256", "embed_dim", "target_mpp", "patch_size")


def save_encoder(encoder, out: Path, meta: dict) -> Path:
    """``encoder.safetensors`` + ``encoder.json`` (``meta`` with the architecture)."""
    from safetensors.torch import save_file

    from pipeline.io import atomic_path, atomic_write_text

    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(out / "encoder.safetensors") as tmp:
        save_file(state, str(tmp))
    return atomic_write_text(out / "encoder.json", json.dumps(meta, indent=2) + "\n")


def load_encoder(folder: Path):
    """``(Cobra in eval mode, meta)`` of a ``train-slide-encoder`` output folder."""
    from safetensors.torch import load_file

    from pipeline.errors import PipelineError
    from pipeline.slide.cobra import Cobra, mamba_available

    folder = Path(folder)
    meta_path = folder / "encoder.json"
    try:
        meta = json.loads(meta_path.read_text())
        state = load_file(str(folder / "encoder.safetensors"))
    except (OSError, ValueError) as exc:
        raise PipelineError(
            f"{folder}: not a trained COBRA encoder ({exc}); run cpath train-slide-encoder "
            "and point --slide_encoder at its --out folder"
        ) from exc
    arch = meta["architecture"]
    if arch["block"] == "mamba2" and not mamba_available():
        raise PipelineError(
            f"{meta_path}: trained with Mamba-2 layers, which need mamba_ssm and a GPU; run on "
            "such a machine or train with --block ssm"
        )
    encoder = Cobra({k: v["dim"] for k, v in meta["inputs"].items()}, **arch)
    encoder.load_state_dict(state)
    return encoder.eval(), meta


def run(cfg: TrainSlideEncoderConfig) -> int:
    from pipeline.config import config_to_dict, save_config
    from pipeline.io import atomic_write_text

    out = Path(cfg.out)
    dims, attrs, cases = collect(cfg)
    block = resolve_block(cfg.block)
    stamp = train_fingerprint(cfg, cases, block)
    resumable = train_fingerprint(cfg, cases, block, tuple(k for k in TRAIN_KEYS if k != "epochs"))
    meta_path = out / "encoder.json"
    if meta_path.is_file() and (out / "encoder.safetensors").is_file():
        try:
            done = json.loads(meta_path.read_text()).get("fingerprint") == stamp
        except ValueError:
            done = False
        if done:
            log.info("%s is up to date with its inputs; skipping", meta_path)
            return 0
    n_slides = sum(len(c) for c in cases)
    log.info(
        "COBRA on %d cases (%d feature files) of %d models: %s",
        len(cases),
        n_slides,
        len(dims),
        ", ".join(f"{k} ({v})" for k, v in dims.items()),
    )
    if len(dims) == 1:
        log.warning(
            "one model only: the views differ by tile sampling alone; give several "
            "--features NAME=DIR for COBRA's cross-model views"
        )
    encoder, losses = train(
        cfg, dims, cases, block, checkpoint=out / "checkpoint.pt", fingerprint=resumable
    )
    lines = ["epoch,loss", *(f"{e + 1},{v:.6f}" for e, v in enumerate(losses))]
    atomic_write_text(out / "metrics.csv", "\n".join(lines) + "\n")
    meta = {
        "method": "cobra",
        "inputs": {
            name: {"dim": dim, **{k: attrs[name][k] for k in ENCODER_INFO if k in attrs[name]}}
            for name, dim in dims.items()
        },
        "architecture": {
            "width": cfg.width,
            "layers": cfg.layers,
            "heads": cfg.heads,
            "att_dim": cfg.att_dim,
            "d_state": cfg.d_state,
            "proj_dim": cfg.proj_dim,
            "dropout": cfg.dropout,
            "block": block,
        },
        "cases": len(cases),
        "feature_files": n_slides,
        "epochs": cfg.epochs,
        "final_loss": losses[-1] if losses else None,
        "config": config_to_dict(cfg),
        "fingerprint": stamp,
    }
    path = save_encoder(encoder, out, meta)
    save_config(cfg, out)
    log.info("COBRA encoder (final loss %.4f) -> %s", losses[-1] if losses else float("nan"), path)
    return 0
