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
