"""Planted task of the expert distillation of ``cpath pretrain --distill.experts`` (GPFM, Ma
et al., 2025): a student distilled from two experts that each know one half of the task.

Synthetic 40-px tiles carry two independent labels: a colour (4 hues) and a texture
(stripes, checkerboard, dots, fine noise; each at a random orientation, frequency and phase,
so that the rotations and flips of the multi-crop views keep the class). Two tiny timm ViTs
are trained supervised (cross-entropy) for ``--expert-steps`` steps, one on the colour, one
on the texture (colour-blind: each tile's colour channels in a random order), and written
as encoder folders: the colour expert at 32 px with patch 8 and
mean = std = 0.5, the texture expert at 32 px with patch 4 (an 8 x 8 patch grid) and
ImageNet statistics. A tiny student (ViT of 2 blocks, 64 wide, patch 8) is then pretrained
for ``--steps`` steps on the tiles by :class:`pipeline.ssl.module.DINOv2Module` (DINO, iBOT,
KoLeo) with both experts (class token 1.0, patch tokens 0.25 each), and once without
experts (``dino only``). Every encoder's class token (the student's: its EMA teacher, as
exported) is probed linearly (:func:`pipeline.eval.protocols.linear_probe`, balanced accuracy
on 600 held-out tiles) on the colour, the texture and their 16 combinations; ranks are
taken per task among the four encoders (ties share their mean rank).

Usage: ``python benchmarks/distill.py [--seeds 3] [--steps 300] [--expert-steps 300]``
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import timm
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.encoders import IMAGENET_MEAN, IMAGENET_STD, load_encoder
from pipeline.eval.protocols import linear_probe
from pipeline.mil.metrics import balanced_accuracy
from pipeline.ssl.config import (
    DataConfig,
    DistillConfig,
    ExpertConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
)
from pipeline.ssl.data import PretrainDataModule, TensorTiles
from pipeline.ssl.export import save_encoder
from pipeline.ssl.module import DINOv2Module
from pipeline.ssl.train import fit_in_process

COLOURS = ((0.85, 0.35, 0.55), (0.45, 0.25, 0.70), (0.60, 0.45, 0.20), (0.25, 0.60, 0.70))
TEXTURES = ("stripes", "checkerboard", "dots", "noise")
TILE, SIZE = 40, 32  # tile side; encoder input side (px)
STUDENT_PATCH = 4
TASKS = ("colour", "texture", "both")
ARMS = ("colour expert", "texture expert", "distilled", "dino only")


def planted_tiles(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """``n`` uint8 tiles ``n x 3 x 40 x 40`` and their colour and texture labels (0-3)."""
    rng = np.random.default_rng(seed)
    colour, texture = rng.integers(0, 4, n), rng.integers(0, 4, n)
    yy, xx = np.mgrid[0:TILE, 0:TILE].astype(np.float32)
    out = np.empty((n, 3, TILE, TILE), np.float32)
    for k in range(n):
        theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.07, 0.14), rng.uniform(0, 6.3)
        u = xx * np.cos(theta) + yy * np.sin(theta)
        v = -xx * np.sin(theta) + yy * np.cos(theta)
        t = texture[k]
        if t == 0:  # stripes
            pattern = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + phase)
        elif t == 1:  # checkerboard
            pattern = (
                np.sin(2 * np.pi * freq * u + phase) * np.sin(2 * np.pi * freq * v) > 0
            ) * 1.0
        elif t == 2:  # dots on a lattice
            period = 1 / freq
            du = (u + phase) % period - period / 2
            dv = v % period - period / 2
            pattern = (du**2 + dv**2 < (0.3 * period) ** 2) * 1.0
        else:  # fine noise
            pattern = rng.uniform(0, 1, (TILE, TILE))
        shade = 0.5 + 0.5 * pattern  # TILE x TILE
        base = np.array(COLOURS[colour[k]], np.float32) * rng.uniform(0.85, 1.15)
        image = base[:, None, None] * shade[None] + rng.normal(0, 0.02, (3, TILE, TILE))
        out[k] = np.clip(image, 0, 1)
    return torch.from_numpy((out * 255).round().astype(np.uint8)), colour, texture


def inputs(tiles: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 tiles -> ``N x 3 x 32 x 32`` float, normalised with ``mean``/``std``."""
    x = F.interpolate(tiles.float() / 255, size=(SIZE, SIZE), mode="bilinear", antialias=True)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def train_expert(
    labels: str, patch: int, mean, std, out: Path, steps: int, seed: int, n: int = 2048
) -> Path:
    """A tiny ViT trained supervised on one label of planted tiles, as an encoder folder.
    The texture expert is trained colour-blind: the colour channels of each tile in a random
    order."""
    tiles, colour, texture = planted_tiles(n, 1000 + seed)
    y = torch.from_numpy(colour if labels == "colour" else texture)
    x = inputs(tiles, (0, 0, 0), (1, 1, 1))  # n x 3 x 32 x 32 in [0, 1]
    mean_, std_ = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    args = {
        "img_size": SIZE,
        "patch_size": patch,
        "depth": 2,
        "embed_dim": 64,
        "num_heads": 2,
        "dynamic_img_size": True,
    }
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, **args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, n, (64,), generator=g)
        batch = torch.rot90(x[idx], int(torch.randint(4, (), generator=g)), dims=(-2, -1))
        if labels == "texture":
            order = torch.argsort(torch.rand(64, 3, generator=g), dim=1)  # 64 x 3
            batch = torch.gather(batch, 1, order[:, :, None, None].expand_as(batch))
        loss = F.cross_entropy(model((batch - mean_) / std_), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    return save_encoder(
        state, "vit_tiny_patch16_224", {**args, "num_classes": 0}, out, SIZE, mean, std
    )


def train_experts(folder: Path, steps: int, seed: int) -> dict[str, Path]:
    """The colour expert (patch 8, mean = std = 0.5) and the texture expert (patch 4,
    ImageNet statistics) as encoder folders under ``folder``."""
    half = (0.5, 0.5, 0.5)
    return {
        "colour": train_expert("colour", 8, half, half, folder / "colour", steps, seed),
        "texture": train_expert(
            "texture", 4, IMAGENET_MEAN, IMAGENET_STD, folder / "texture", steps, seed
        ),
    }


def student_data(batch_size: int = 32) -> DataConfig:
    return DataConfig(
        batch_size=batch_size,
        workers=0,
        global_size=SIZE,
        local_size=16,
        local_crops=2,
        global_scale=(0.5, 1.0),
        local_scale=(0.2, 0.5),
        stain_augment=False,
        blur=0.0,
    )


def train_student(
    experts: dict[str, Path] | None,
    steps: int,
    seed: int,
    patch: int = STUDENT_PATCH,
    batch_size: int = 32,
) -> DINOv2Module:
    """The tiny student pretrained on planted tiles, distilled from ``experts`` (or not)."""
    L.seed_everything(seed, verbose=False)
    model = ModelConfig(
        arch="vit_tiny_patch16_224",
        arch_kwargs={
            "img_size": SIZE,
            "patch_size": patch,
            "depth": 2,
            "embed_dim": 64,
            "num_heads": 2,
        },
        layerscale=None,
        drop_path_rate=0.0,
        prototypes=256,
        head_hidden=128,
        head_bottleneck=32,
    )
    loss = LossConfig(teacher_temp_warmup_steps=steps // 3)
    optim = OptimConfig(
        base_lr=0.05,
        warmup_steps=steps // 10,
        freeze_last_layer_steps=steps // 20,
        momentum_teacher=0.95,
        layer_decay=1.0,
    )
    distill = None
    if experts:
        distill = DistillConfig(
            experts=[
                ExpertConfig(k, str(v), cls_weight=1.0, patch_weight=0.25)
                for k, v in experts.items()
            ],
            head_bottleneck=64,
        )
    data = student_data(batch_size)
    module = DINOv2Module.from_configs(model, loss, optim, steps, data=data, distill=distill)
    datamodule = PretrainDataModule(data, loss, patch_size=patch, max_steps=steps)
    datamodule.dataset = TensorTiles(planted_tiles(2048, 2000 + seed)[0], data)
    fit_in_process(module, datamodule, steps, tempfile.mkdtemp(prefix="cpath-distill-"))
    return module


@torch.no_grad()
def embed_arms(
    experts: dict[str, Path], students: dict[str, DINOv2Module], tiles: torch.Tensor
) -> dict[str, np.ndarray]:
    """The class token of each encoder for ``tiles`` (students: their EMA teacher)."""
    out = {}
    for arm, key in (("colour expert", "colour"), ("texture expert", "texture")):
        encoder = load_encoder(experts[key])
        out[arm] = encoder.model(inputs(tiles, encoder.mean, encoder.std)).numpy()
    data = student_data()
    for arm, module in students.items():
        module.teacher.eval()
        out[arm] = module.teacher.backbone(inputs(tiles, data.mean, data.std))[0].numpy()
    return out


def ranks(scores: dict[str, float]) -> dict[str, float]:
    """Rank 1 for the best score; ties share their mean rank."""
    values = sorted(scores.values(), reverse=True)
    first = {v: values.index(v) + 1 for v in values}
    return {k: first[v] + (values.count(v) - 1) / 2 for k, v in scores.items()}


def probe_accuracies(
    experts: dict[str, Path],
    students: dict[str, DINOv2Module],
    seed: int,
    n: int = 600,
    tasks: tuple[str, ...] = TASKS,
    c: float | None = None,
) -> dict[str, dict[str, float]]:
    """Balanced accuracy ``{encoder: {task: acc}}`` of a linear probe on the class tokens of
    ``n`` planted tiles, tested on ``n`` others (``C`` chosen on a validation split, or
    ``c``)."""
    train_tiles, train_c, train_t = planted_tiles(n, 3000 + seed)
    test_tiles, test_c, test_t = planted_tiles(n, 4000 + seed)
    train_x = embed_arms(experts, students, train_tiles)
    test_x = embed_arms(experts, students, test_tiles)
    labels = {
        "colour": (train_c, test_c),
        "texture": (train_t, test_t),
        "both": (4 * train_c + train_t, 4 * test_c + test_t),
    }
    acc: dict[str, dict[str, float]] = {arm: {} for arm in train_x}
    for task in tasks:
        y_train, y_test = labels[task]
        for arm in train_x:
            if c is None:
                proba, _ = linear_probe(train_x[arm], y_train, test_x[arm], seed=seed)
            else:
                probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
                proba = probe.fit(train_x[arm], y_train).predict_proba(test_x[arm])
            acc[arm][task] = float(balanced_accuracy(y_test, proba.argmax(1)))
    return acc


def run_seed(seed: int, steps: int, expert_steps: int, folder: Path) -> dict:
    """Balanced accuracies ``{arm: {task: acc}}`` and the times of one seed."""
    t0 = time.perf_counter()
    experts = train_experts(folder, expert_steps, seed)
    t1 = time.perf_counter()
    students = {"distilled": train_student(experts, steps, seed)}
    t2 = time.perf_counter()
    students["dino only"] = train_student(None, steps, seed)
    t3 = time.perf_counter()
    acc = probe_accuracies(experts, students, seed)
    times = {"experts_s": t1 - t0, "distilled_s": t2 - t1, "dino_only_s": t3 - t2}
    return {"acc": acc, "times": times}


def summarise(results: list[dict]) -> dict:
    """Mean accuracies, the ratios of the distilled student to each expert on its task, and
    mean ranks over (colour, texture) and over all three tasks, per seed and averaged."""
    mean = {
        arm: {task: float(np.mean([r["acc"][arm][task] for r in results])) for task in TASKS}
        for arm in ARMS
    }
    per_seed = []
    for r in results:
        task_ranks = {task: ranks({arm: r["acc"][arm][task] for arm in ARMS}) for task in TASKS}
        per_seed.append(
            {
                "colour_ratio": r["acc"]["distilled"]["colour"]
                / r["acc"]["colour expert"]["colour"],
                "texture_ratio": r["acc"]["distilled"]["texture"]
                / r["acc"]["texture expert"]["texture"],
                "rank2": {a: np.mean([task_ranks[t][a] for t in TASKS[:2]]) for a in ARMS},
                "rank3": {a: np.mean([task_ranks[t][a] for t in TASKS]) for a in ARMS},
            }
        )
    return {"mean": mean, "per_seed": per_seed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--expert-steps", type=int, default=300)
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            results.append(run_seed(seed, args.steps, args.expert_steps, Path(tmp) / str(seed)))
    summary = summarise(results)
    print(
        f"linear probe, balanced accuracy, mean of {args.seeds} seeds ({args.steps} student steps)"
    )
    print(f"| encoder | {' | '.join(TASKS)} | mean rank (colour, texture) | mean rank (all 3) |")
    print("|---|" + "---|" * (len(TASKS) + 2))
    for arm in ARMS:
        r2 = np.mean([s["rank2"][arm] for s in summary["per_seed"]])
        r3 = np.mean([s["rank3"][arm] for s in summary["per_seed"]])
        accs = " | ".join(f"{summary['mean'][arm][t]:.3f}" for t in TASKS)
        print(f"| {arm} | {accs} | {r2:.2f} | {r3:.2f} |")
    for seed, s in enumerate(summary["per_seed"]):
        accs = "; ".join(
            f"{arm} " + "/".join(f"{results[seed]['acc'][arm][t]:.3f}" for t in TASKS)
            for arm in ARMS
        )
        print(f"seed {seed} ({'/'.join(TASKS)}): {accs}")
        best2 = all(s["rank2"]["distilled"] < s["rank2"][a] for a in ARMS[:2])
        best3 = all(s["rank3"]["distilled"] < s["rank3"][a] for a in ARMS[:2])
        print(
            f"seed {seed}: distilled / colour expert on colour {s['colour_ratio']:.3f}, "
            f"/ texture expert on texture {s['texture_ratio']:.3f}; better mean rank than both "
            f"experts: {best2} (colour, texture), {best3} (all 3); "
            + ", ".join(f"{k} {v:.1f} s" for k, v in results[seed]["times"].items())
        )


if __name__ == "__main__":
    main()
