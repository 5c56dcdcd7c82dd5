"""The kNN probe of pretraining on small labelled tile sets."""

import logging
from types import SimpleNamespace

import numpy as np
import torch

from pipeline.ssl.monitors import KNNProbe
from pipeline.ssl.probe import knn_probe


def small_probe(slides: int = 4, per_slide: int = 6, seed: int = 0):
    """``(features N x 8, labels, groups)``: two well-separated classes on every slide."""
    rng = np.random.default_rng(seed)
    labels = np.array(["tumor", "normal"] * (slides * per_slide // 2))
    centres = {"tumor": np.eye(8)[0] * 4, "normal": np.eye(8)[1] * 4}
    feats = np.stack([centres[y] for y in labels]) + rng.normal(size=(len(labels), 8))
    groups = np.repeat([f"slide-{i}" for i in range(slides)], per_slide)
    return feats.astype(np.float32), labels, groups


def test_knn_probe_caps_k_by_the_training_fold():
    feats, labels, groups = small_probe()  # 24 tiles of 4 slides: 18 per training fold
    score = knn_probe(feats, labels, groups, k=20)
    assert score > 0.9  # k = 18 here, not 23 (> 18: scikit-learn's ValueError)


class Recorder:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, metrics))


def probe_callback(tiny_module, labels, groups):
    probe = KNNProbe("probe.csv", every=1, size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    probe.images = torch.randint(0, 256, (len(labels), 3, 16, 16), dtype=torch.uint8)
    probe.labels, probe.groups = labels, groups
    logger = Recorder()
    trainer = SimpleNamespace(is_global_zero=True, loggers=[logger], global_step=12)
    return probe, trainer, logger, tiny_module()


def test_probe_is_logged(tiny_module):
    _, labels, groups = small_probe()
    probe, trainer, logger, module = probe_callback(tiny_module, labels, groups)
    probe.probe(trainer, module)
    assert len(logger.rows) == 1 and logger.rows[0][0] == 12
    assert 0.0 <= logger.rows[0][1]["probe/knn_bacc"] <= 1.0


def test_a_probe_that_cannot_be_scored_warns_instead_of_ending_the_run(tiny_module, caplog):
    _, labels, _ = small_probe()
    one_slide = np.array(["slide-0"] * len(labels))  # no slide-grouped folds possible
    probe, trainer, logger, module = probe_callback(tiny_module, labels, one_slide)
    with caplog.at_level(logging.WARNING, logger="pipeline.ssl.monitors"):
        probe.probe(trainer, module)
    assert logger.rows == [] and "kNN probe of probe.csv skipped at step 12" in caplog.text


def unit_at(degrees) -> np.ndarray:
    """Unit vectors in the plane at the given angles (cosine similarity falls with the angle)."""
    rad = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], 1).astype(np.float32)


def test_slide_knn_accuracy_by_hand():
    from pipeline.ssl.probe import slide_knn_accuracy

    # tiles at 0, 10, 20 deg (slide a), 100, 110 (slide c), 32 (slide b); k = 2:
    # t0: t1, t2 -> a. t1: t0, t2 -> a. t2: t1 (10 deg), t5 (12 deg) -> a 1, b 1: the
    # nearer a wins. t3: t4 (c), t5 (68 deg, b) -> tie, c nearer wins (a plain argmax of
    # votes would take b, the lower index). t4: t3, t5 -> c. t5: t2, t1 -> a, wrong.
    feats = unit_at([0, 10, 20, 100, 110, 32])
    slides = np.array(["a", "a", "a", "c", "c", "b"])
    assert slide_knn_accuracy(feats, slides, k=2) == 5 / 6  # with itself as a neighbour: 1
    assert slide_knn_accuracy(feats * 7.0, slides, k=2) == 5 / 6  # cosine: scale-free
    # k capped at N - 1 = 5: a (3 tiles) outvotes c and b for their tiles; a's own tiles
    # see a 2, c 2, b 1 and a is nearer
    assert slide_knn_accuracy(feats, slides, k=50) == 3 / 6


def test_probe_logs_the_robustness_index_across_slides(tiny_module):
    _, labels, groups = small_probe()  # both classes on every slide
    probe, trainer, logger, module = probe_callback(tiny_module, labels, groups)
    probe.probe(trainer, module)
    index = logger.rows[0][1]["probe/robustness_index"]
    assert 0.0 <= index <= 1.0


def test_slide_knn_monitor_samples_tissue_tiles_and_logs(tiny_module, tiny_prep):
    from pipeline.ssl.config import DataConfig
    from pipeline.ssl.data import PretrainTiles, background_share
    from pipeline.ssl.monitors import SlideKNN

    dataset = PretrainTiles(DataConfig(coords=tiny_prep / "coords", global_size=16))
    monitor = SlideKNN(every=3, slides=3, tiles=4, size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    logger = Recorder()
    trainer = SimpleNamespace(
        is_global_zero=True,
        loggers=[logger],
        global_step=3,
        datamodule=SimpleNamespace(dataset=dataset),
    )
    module = tiny_module()
    monitor.on_train_batch_end(trainer, module, None, None, 0)
    assert monitor.images.shape == (12, 3, 16, 16) and len(np.unique(monitor.slide_ids)) == 3
    assert all(background_share(t) <= 0.7 for t in monitor.images)
    first = monitor.images.clone()
    again = SlideKNN(every=3, slides=3, tiles=4, size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    again.sample(dataset)
    assert torch.equal(again.images, first)  # a function of the seed: the same on every rank
    step, metrics = logger.rows[0]
    assert step == 3 and 0.0 <= metrics["collapse/slide_knn_acc"] <= 1.0
    assert metrics["collapse/slide_knn_chance"] == 4 / 12
    trainer.global_step = 4  # off the interval: nothing
    monitor.on_train_batch_end(trainer, module, None, None, 0)
    assert len(logger.rows) == 1
