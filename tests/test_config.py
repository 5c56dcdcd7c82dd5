from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import load_config, normalize_argv, save_config
from pipeline.errors import ConfigError
from pipeline.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FOLDERS = {
    "demo": "demo",
    "preprocess": "preprocess",
    "stain": "stain",
    "pretrain": "pretrain",
    "extract": "extract",
    "train-mil": "mil",
    "evaluate": "benchmarks",
    "curate": "curate",
}


@dataclass
class Inner:
    method: str = "otsu"
    level_mpp: float = 8.0


@dataclass
class Outer:
    out: Path = Path("runs/x")
    tile_size: int = 256
    mpp: float | None = 0.5
    dry_run: bool = False
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides_resolve_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tile_size: 512\ninner:\n  method: triangle\n")
    cfg = load_config(Outer, path, mpp=0.25, **{"inner.level_mpp": 16.0})
    assert cfg == Outer(tile_size=512, mpp=0.25, inner=Inner("triangle", 16.0))
    assert isinstance(cfg.out, Path) and isinstance(cfg.inner, Inner)


@pytest.mark.parametrize("text,key", [("bogus: 1\n", "bogus"), ("inner:\n  colour: 3\n", "colour")])
def test_unknown_yaml_key_names_the_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=key) as err:
        load_config(Outer, path)
    assert str(path) in str(err.value)


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="tile_size"):
        load_config(Outer, tile_size="big")


def test_dashes_and_bare_flags():
    argv = ["--tile-size", "224", "--dry-run", "--inner.level-mpp=4", "--out", "--x"]
    assert normalize_argv(argv, {"dry_run"}) == [
        "--tile_size",
        "224",
        "--dry_run",
        "true",
        "--inner.level_mpp=4",
        "--out",
        "--x",
    ]


def test_saved_config_loads_back_identically(tmp_path):
    cfg = Outer(out=tmp_path / "o", tile_size=128, mpp=None, dry_run=True, inner=Inner("x", 2.0))
    path = save_config(cfg, tmp_path)
    assert path == tmp_path / "config.yaml"
    assert yaml.safe_load(path.read_text())["inner"] == {"method": "x", "level_mpp": 2.0}
    assert load_config(Outer, path) == cfg


def test_cli_rejects_unknown_option_naming_it(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--n-slides", "3", "--colour", "red"])
    assert exit_.value.code == 2
    assert "--colour" in capsys.readouterr().err


def test_cli_rejects_unknown_yaml_key_naming_it(tmp_path, capsys):
    path = tmp_path / "demo.yaml"
    path.write_text("n_slides: 3\nslide_count: 4\n")
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--config", str(path)])
    assert exit_.value.code == 2
    assert "slide_count" in capsys.readouterr().err


@pytest.mark.parametrize("stage", sorted(CONFIG_FOLDERS))
def test_shipped_configs_parse(stage):
    config_cls, _ = STAGES[stage].load()
    files = sorted((ROOT / "configs" / CONFIG_FOLDERS[stage]).glob("*.yaml"))
    assert files, f"configs/{CONFIG_FOLDERS[stage]} has no YAML"
    for path in files:
        assert isinstance(load_config(config_cls, path), config_cls)


def test_config_reference_is_current():
    """docs/configs.md is generated from the stage configs; regenerate it when they change:
    `python -m pipeline.reference > docs/configs.md`."""
    from pipeline.reference import reference

    assert (ROOT / "docs" / "configs.md").read_text() == reference()
