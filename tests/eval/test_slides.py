"""Slide-task splits follow the labels, and cached task results follow the scoring."""

import logging

from pipeline.eval.evaluate import EvaluateConfig
from pipeline.eval.slides import current_splits
from pipeline.eval.suite import _settings, cached_result
from pipeline.mil.splits import make_splits, read_splits


def _slides(case_of=lambda i: f"p{i // 2}"):
    return [{"slide_id": f"s{i}", "case_id": case_of(i), "label": "ab"[i % 2]} for i in range(12)]


def test_slide_task_splits_are_made_again_for_new_patients(tmp_path, caplog):
    path = tmp_path / "splits_seed0.csv"
    current_splits(path, make_splits(_slides(lambda i: f"s{i}"), 3, 0.0, 0))  # no case_id yet
    stamp = path.stat().st_mtime_ns
    current_splits(path, make_splits(_slides(lambda i: f"s{i}"), 3, 0.0, 0))
    assert path.stat().st_mtime_ns == stamp  # unchanged: kept
    with caplog.at_level(logging.WARNING):
        current_splits(path, make_splits(_slides(), 3, 0.0, 0))  # case_id added
    assert "made again" in caplog.text
    splits = read_splits(path)
    for k in range(3):
        test = {r["case_id"] for r in splits if r[f"fold_{k}"] == "test"}
        assert test and not test & {r["case_id"] for r in splits if r[f"fold_{k}"] != "test"}


def test_results_cached_before_the_cluster_bootstrap_are_recomputed(tmp_path):
    settings = _settings(EvaluateConfig())
    old = {k: v for k, v in settings.items() if k != "result_version"}
    path = tmp_path / "result.json"
    cached_result(path, {"task": "t", "settings": old}, lambda: {"ci": [0.4, 0.5]})
    fresh = cached_result(path, {"task": "t", "settings": settings}, lambda: {"ci": [0.2, 0.7]})
    assert fresh == {"ci": [0.2, 0.7]}
