import numpy as np
from PIL import Image

from pipeline.cli import main
from pipeline.mil.train import TrainMILConfig
from pipeline.mil.training import train_cv


def test_heatmap_and_top_tiles_of_a_trained_run(tiny_features, tiny_cohort, tmp_path, capsys):
    run = tmp_path / "run"
    train_cv(TrainMILConfig(features=tiny_features, labels=tiny_cohort / "labels.csv", out=run,
                            folds=2, epochs=2, progress=False, bootstrap=20))  # fmt: skip
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
