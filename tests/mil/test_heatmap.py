import numpy as np
from PIL import Image

from pipeline.cli import main
from pipeline.mil.train import TrainMILConfig
from pipeline.mil.training import train_cv


def test_heatmap_and_top_tiles_of_a_trained_run(tiny_features, tiny_cohort, tmp_path, capsys):
    run = tmp_path / "run"
    train_cv(
        TrainMILConfig(
            features=tiny_features,
            labels=tiny_cohort / "labels.csv",
            out=run,
            folds=2,
            epochs=2,
            progress=False,
            bootstrap=20,
        )
    )
    out = tmp_path / "hm.png"
    assert (
        main(
            ["heatmap", "--run", str(run), "--slide", "demo_000", "--out", str(out), "--top_k", "4"]
        )
        == 0
    )
    image = np.asarray(Image.open(out))
    assert image.ndim == 3 and min(image.shape[:2]) > 100
    strip = np.asarray(Image.open(tmp_path / "hm_top.png"))
    assert strip.shape == (128, 4 * 128, 3)  # four 128-px tiles side by side
    assert main(["heatmap", "--run", str(run), "--slide", "nope"]) == 1
    assert "nope: not in" in capsys.readouterr().err


def test_heatmap_of_a_run_with_given_splits(tiny_features, tiny_cohort, tmp_path):
    """A run trained on a --splits file (as evaluate's slide tasks are) has no splits.csv;
    a stale one in the folder must not be read either."""
    from pipeline.mil.splits import make_splits, write_splits
    from pipeline.mil.training import read_labels

    rows = read_labels(tiny_cohort / "labels.csv", "classification")
    given = write_splits(tmp_path / "splits_seed0.csv", make_splits(rows, 2, 0.0, seed=0))
    run = tmp_path / "seed_0"
    train_cv(
        TrainMILConfig(
            features=tiny_features,
            labels=tiny_cohort / "labels.csv",
            out=run,
            splits=given,
            folds=2,
            epochs=1,
            val_share=0.0,
            progress=False,
            bootstrap=0,
        )
    )
    assert not (run / "splits.csv").exists()
    slide = rows[0]["slide_id"]
    out = tmp_path / "hm.png"
    assert main(["heatmap", "--run", str(run), "--slide", slide, "--out", str(out)]) == 0
    stale = [r for r in make_splits(rows, 2, 0.0, seed=5) if r["slide_id"] != slide]
    write_splits(run / "splits.csv", stale)  # e.g. left from an earlier run in the folder
    assert main(["heatmap", "--run", str(run), "--slide", slide, "--out", str(out)]) == 0
