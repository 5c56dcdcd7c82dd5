"""A planted task for COBRA slide encoders (:mod:`pipeline.slide.cobra`): several synthetic
"foundation models" seeing the same tiles.

Every tile has a latent signal ``z`` (L-d): one of ``types`` tissue prototypes plus noise.
A slide is a sparse mixture of the types (Dirichlet proportions) with 40 to 80 tiles at
distinct grid coordinates. Labels (alternating 0, 1) by ``task``: ``composition``, label-1
slides have 0.2 more of type 0 in their proportions (renormalised); ``tumour``, label-1
slides have 5 to 15% of their tiles of one more type, label-0 slides none. Model ``m`` maps
a tile to ``tanh(z W_m + b_m)`` plus small noise (``W_m`` a random L x D_m map, different
per model), so the models share the tiles' content but not their feature space. A slide encoder that
captures the content retrieves a slide seen by one model from the same slide seen by
another, and its attention transfers to a model it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PlantedSlide:
    slide_id: str
    label: int
    coords: np.ndarray  # N x 2, level-0 (x, y), in a random order
    latents: np.ndarray  # N x L


class PlantedModels:
    """Random nonlinear "foundation models" of a shared latent tile space."""

    def __init__(
        self,
        dims: dict[str, int],
        latent: int = 8,
        types: int = 16,
        concentration: float = 0.1,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.latent, self.types, self.concentration = latent, types, concentration
        self.prototypes = rng.normal(0, 1.5, (types + 1, latent))  # (T + 1) x L, last: tumour
        self.maps = {
            name: (rng.normal(0, 1 / np.sqrt(latent), (latent, d)), rng.normal(0, 0.5, d))
            for name, d in dims.items()
        }

    def slides(
        self, n: int, seed: int, prefix: str = "s", task: str = "composition"
    ) -> list[PlantedSlide]:
        """``n`` slides, labels alternating 0, 1, planted as ``task`` says."""
        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            label = i % 2
            p = rng.dirichlet(np.full(self.types, self.concentration))
            if task == "composition":
                p[0] += 0.2 * label
                p /= p.sum()
            tiles = int(rng.integers(40, 81))
            kinds = rng.choice(self.types, tiles, p=p)
            if label and task == "tumour":
                tumour = max(1, round(tiles * rng.uniform(0.05, 0.15)))
                kinds[rng.choice(tiles, tumour, replace=False)] = self.types
            z = self.prototypes[kinds] + rng.normal(0, 0.5, (tiles, self.latent))  # N x L
            cells = rng.choice(32 * 32, tiles, replace=False)
            coords = np.stack([cells % 32, cells // 32], 1) * 256  # N x 2
            out.append(PlantedSlide(f"{prefix}{i:03d}", label, coords, z))
        return out

    def features(self, name: str, slide: PlantedSlide, seed: int = 0) -> np.ndarray:
        """Model ``name``'s tile features of ``slide`` (N x D, rows as ``slide.coords``)."""
        w, b = self.maps[name]
        rng = np.random.default_rng(seed)
        x = np.tanh(slide.latents @ w + b)  # N x D
        return (x + rng.normal(0, 0.05, x.shape)).astype(np.float32)


def retrieval_top1(queries: np.ndarray, keys: np.ndarray) -> float:
    """Share of rows of ``queries`` (S x C) whose most cosine-similar row of ``keys`` (S x C)
    is the same slide (same row)."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    k = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    return float(np.mean((q @ k.T).argmax(1) == np.arange(len(q))))


def run_planted(
    seed: int = 0,
    train_slides: int = 96,
    test_slides: int = 40,
    probe_slides: int = 400,
    task: str = "composition",
    types: int = 16,
    concentration: float = 0.1,
    **overrides,
) -> dict:
    """Train a tiny COBRA encoder on models ``a``, ``b``, ``c`` of a planted cohort (``types``
    tile types, Dirichlet ``concentration``; probe labels planted as ``task``) and score it;
    ``overrides`` change :class:`~pipeline.slide.cobra_train.TrainSlideEncoderConfig`.

    Returns ``{"retrieval": {"a->b": top-1, ...}, "retrieval_mean", "auc": {"mean pooling",
    "cobra <- a", ...}, "seconds"}``: cross-model retrieval of held-out slides in the
    contrastive space (the projector's output), and the 5-fold cross-validated AUC of a
    linear head on the slide embeddings of an unseen model ``d`` (mean pooling of its tiles,
    or its tiles weighted by the attention the encoder computes from ``a``, ``b`` or ``c``).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and immune to busy cores
    try:
        return _run_planted(
            seed, train_slides, test_slides, probe_slides, task, types, concentration, overrides
        )
    finally:
        torch.set_num_threads(threads)


def _run_planted(
    seed: int,
    train_slides: int,
    test_slides: int,
    probe_slides: int,
    task: str,
    types: int,
    concentration: float,
    overrides: dict,
) -> dict:
    import time

    import torch

    from pipeline.slide.cobra import aggregate, sort_yx
    from pipeline.slide.cobra_train import SlideFeatures, TrainSlideEncoderConfig, train
    from pipeline.slide.head import cross_validate

    start = time.perf_counter()
    dims = {"a": 16, "b": 24, "c": 32, "d": 20}
    models = PlantedModels(dims, types=types, concentration=concentration, seed=seed)
    seen = ("a", "b", "c")
    cases = [  # one case a slide, seen by the three models
        [
            SlideFeatures(m, s.slide_id, feats=models.features(m, s, k), coords=s.coords)
            for k, m in enumerate(seen)
        ]
        for s in models.slides(train_slides, seed + 1, "t")
    ]
    settings = {
        "width": 32,
        "layers": 1,
        "heads": 4,
        "att_dim": 16,
        "d_state": 8,
        "proj_dim": 32,
        "dropout": 0.0,
        "predictor": False,
        "tiles_per_view": 128,
        "min_keep": 0.9,
        "epochs": 100,
        "batch_size": 32,
        "lr": 1e-2,
        "weight_decay": 0.05,
        "warmup_epochs": 3,
        "seed": seed,
        "device": "cpu",
        **overrides,
    }
    cfg = TrainSlideEncoderConfig(**settings)
    encoder, _ = train(cfg, {m: dims[m] for m in seen}, cases)

    def encode(name: str, slide: PlantedSlide) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        order = sort_yx(slide.coords)
        x = torch.from_numpy(models.features(name, slide, seed=99)[order])[None]  # 1 x N x D
        with torch.no_grad():
            out = encoder(name, x, torch.ones(x.shape[:2], dtype=torch.bool))
            proj = encoder.proj(out["embedding"])[0].numpy()  # C
        return proj, out["attention"][0].numpy(), slide.coords[order]

    held_out = models.slides(test_slides, seed + 2, "h")
    projected = {m: np.stack([encode(m, s)[0] for s in held_out]) for m in seen}
    retrieval = {
        f"{a}->{b}": retrieval_top1(projected[a], projected[b])
        for a in seen
        for b in seen
        if a != b
    }
    probe = models.slides(probe_slides, seed + 3, "p", task)
    labels = [str(s.label) for s in probe]
    unseen = [models.features("d", s, seed=7) for s in probe]  # N x 20 each
    auc = {"mean pooling": cross_validate(np.stack([x.mean(0) for x in unseen]), labels)}
    for m in seen:
        rows = []
        for s, x in zip(probe, unseen, strict=True):
            _, attention, coords = encode(m, s)
            rows.append(aggregate(attention, coords, x, s.coords))  # 20
        auc[f"cobra <- {m}"] = cross_validate(np.stack(rows), labels)
    return {
        "retrieval": retrieval,
        "retrieval_mean": float(np.mean(list(retrieval.values()))),
        "auc": {k: v["mean"]["auc"] for k, v in auc.items()},
        "seconds": time.perf_counter() - start,
    }
