"""Stage configs: dataclasses filled from YAML files and command-line overrides.

Every stage has one dataclass config. :func:`stage_parser` turns it into a
jsonargparse parser (``--config FILE.yaml`` plus ``--key value`` for every field,
``--group.key value`` for nested ones); unknown keys are rejected with a message
that names them. Keys may be written with dashes or underscores on the command
line (``--tile-size`` = ``--tile_size``). The resolved config is saved next to
every stage's outputs with :func:`save_config`.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

import pipeline
from pipeline.errors import ConfigError
from pipeline.io import atomic_write_text

C = TypeVar("C")


def bool_keys(config_cls: type, prefix: str = "") -> set[str]:
    """Dotted names of the ``bool`` fields of a (nested) dataclass config."""
    keys = set()
    for f, hint in _field_types(config_cls):
        if hint is bool:
            keys.add(prefix + f.name)
        elif dataclasses.is_dataclass(hint):
            keys |= bool_keys(hint, f"{prefix}{f.name}.")
    return keys


def _field_types(config_cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(config_cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(config_cls)]


def normalize_argv(argv: list[str], flags: set[str] = frozenset()) -> list[str]:
    """Make the command line friendlier before jsonargparse parses it.

    ``--tile-size`` is read as ``--tile_size``, and a boolean key in ``flags`` given
    without a value (``--make-data``) means ``--make_data true``.
    """
    out = []
    for i, arg in enumerate(argv):
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            arg = f"--{key}{eq}{value}"
            following = argv[i + 1] if i + 1 < len(argv) else None
            if key in flags and not eq and (following is None or following.startswith("-")):
                out += [arg, "true"]
                continue
        out.append(arg)
    return out


def stage_parser(config_cls: type, description: str = "", **kwargs: Any) -> ArgumentParser:
    """A parser with ``--config`` and one option per field of ``config_cls``."""
    parser = ArgumentParser(description=description, **kwargs)
    parser.add_argument(
        "--config", action=ActionConfigFile, help="YAML config; later options override it"
    )
    parser.add_class_arguments(config_cls, as_group=False)
    return parser


def config_from_namespace(config_cls: type[C], namespace: Any) -> C:
    """Build ``config_cls`` from a parsed (and instantiated) jsonargparse namespace."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(namespace).items() if k in names})


def load_config(config_cls: type[C], path: str | os.PathLike | None = None, **overrides: Any) -> C:
    """Python API: ``config_cls`` from an optional YAML file plus keyword overrides.

    Nested fields are overridden with dotted keys passed as a dict, e.g.
    ``load_config(PreprocessConfig, "x.yaml", **{"tissue.method": "otsu"})``.
    Raises :class:`ConfigError` naming the offending key or value.
    """
    parser = stage_parser(config_cls, exit_on_error=False)
    argv = [] if path is None else ["--config", str(path)]
    for key, value in overrides.items():
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        argv += [f"--{key}", value if isinstance(value, str) else yaml.safe_dump(value).strip()]
    try:
        namespace = parser.parse_args(normalize_argv(argv, bool_keys(config_cls)))
    except Exception as exc:  # jsonargparse raises ArgumentError or ValueError subclasses
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid {config_cls.__name__}{where}: {exc}") from exc
    return config_from_namespace(config_cls, parser.instantiate(namespace))


def config_to_dict(cfg: Any) -> Any:
    """Plain YAML-serialisable form of a (nested) dataclass config."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, os.PathLike):
        return os.fspath(cfg)
    return cfg


def save_config(cfg: Any, out_dir: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved ``cfg`` (plus the package version) to ``out_dir/name`` atomically."""
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    header = f"# resolved {type(cfg).__name__}, cpath-pipeline {pipeline.__version__}\n"
    return atomic_write_text(Path(out_dir) / name, header + body)
