import json
import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.stages import STAGES


def _cpath(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def test_top_level_help_lists_every_stage():
    proc = _cpath("--help")
    assert proc.returncode == 0
    for name in STAGES:
        assert name in proc.stdout


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_subcommand_has_help(stage, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([stage, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and f"cpath [options] {stage}" in out


def test_info_reports_versions_devices_openslide_and_demo(tiny_cohort):
    proc = _cpath("info", "--json", "--demo", str(tiny_cohort))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["versions"]["torch"].startswith("2.")
    assert info["devices"]["cpu_cores"] >= 1 and isinstance(info["devices"]["cuda"], bool)
    assert info["openslide"]["library"].count(".") >= 1
    assert info["demo_data"] == {
        "path": str(tiny_cohort.resolve()),
        "present": True,
        "n_slides": 6,
        "missing": [],
    }
    text = _cpath("info", "--demo", str(tiny_cohort / "nowhere")).stdout
    assert "absent: run `make demo`" in text


def test_print_config_shows_resolved_values():
    proc = _cpath("demo", "--n-slides", "7", "--print_config")
    assert proc.returncode == 0
    assert "n_slides: 7" in proc.stdout


def test_evaluate_without_encoders_fails_with_clear_message():
    proc = _cpath("evaluate", "--out", "nowhere")
    assert proc.returncode == 1
    assert "no encoders" in proc.stderr and "Traceback" not in proc.stderr


def test_positional_words_fill_the_action_fields():
    from pipeline.cli import positional_to_options
    from pipeline.ssl.pretrain import PretrainConfig
    from pipeline.stain.cli import StainConfig

    args = ["pretrain", "export", "run/last.ckpt", "--out", "x"]
    assert positional_to_options(args, "pretrain", PretrainConfig) == [
        "pretrain",
        "--action",
        "export",
        "--ckpt_path",
        "run/last.ckpt",
        "--out",
        "x",
    ]
    assert positional_to_options(["stain", "fit", "--method", "macenko"], "stain", StainConfig) == [
        "stain",
        "--action",
        "fit",
        "--method",
        "macenko",
    ]
    proc = _cpath("pretrain", "export", "--out", "nowhere")
    assert proc.returncode == 1 and "needs a checkpoint" in proc.stderr
    proc = _cpath("pretrain", "export", "missing.ckpt")
    assert proc.returncode == 1 and "missing.ckpt: checkpoint not found" in proc.stderr


@pytest.mark.parametrize(
    "args, absent",
    [
        (["--help"], ["torch", "lightning", "timm", "jsonargparse", "pipeline.wsi.preprocess"]),
        (["--version"], ["torch", "jsonargparse"]),
        (["preprocess", "--help"], ["torch", "lightning", "timm"]),
    ],
)
def test_start_up_imports_only_what_the_stage_needs(args, absent):
    """`cpath --help` lists the stages without importing any; a stage imports its own
    module only (preprocessing needs no torch)."""
    code = (
        "import sys\nfrom pipeline.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {absent!r} if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
