"""``cpath``: one sub-command per stage. Parse the config, call the stage function.

Every sub-command takes ``--config FILE.yaml`` and ``--key value`` overrides of any
config key (``cpath <stage> --print_config`` shows the resolved config).

Only the named stage's module is imported (and with it torch, Lightning or timm only
when that stage needs them); ``cpath``, ``cpath --help`` and ``cpath --version`` import
no stage at all.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Iterable

import pipeline
from pipeline.errors import PipelineError
from pipeline.stages import STAGES

DESCRIPTION = (
    "Computational-pathology foundation-model pipeline: slides -> tiles -> stain -> SSL "
    "pretraining -> features -> MIL -> evaluation."
)


def stage_list_parser() -> argparse.ArgumentParser:
    """The top-level parser of ``cpath`` without a stage: every stage's name and help,
    read from :data:`pipeline.stages.STAGES` without importing any stage."""
    parser = argparse.ArgumentParser(
        prog="cpath", description=DESCRIPTION, epilog="`cpath <stage> --help`: a stage's options."
    )
    parser.add_argument("--version", action="version", version=pipeline.__version__)
    stages = parser.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for name, stage in STAGES.items():
        stages.add_parser(name, help=stage.help, add_help=False)
    return parser


def build_parser(names: Iterable[str] | None = None):
    """The ``cpath`` parser (jsonargparse) with the sub-commands ``names`` (default all) and,
    per sub-command, its config class and stage function."""
    from jsonargparse import ArgumentParser

    from pipeline.config import stage_parser

    parser = ArgumentParser(prog="cpath", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=pipeline.__version__)
    subcommands = parser.add_subcommands(dest="stage")
    loaded = {}
    for name in STAGES if names is None else names:
        stage = STAGES[name]
        config_cls, run = stage.load()
        doc = (config_cls.__doc__ or "").strip().split("\n\n")[0]
        subcommands.add_subcommand(name, stage_parser(config_cls, doc), help=stage.help)
        loaded[name] = (config_cls, run)
    return parser, loaded


class _DropNoise(logging.Filter):
    NOISE = ("litlogger", "`weights_only` was not set", "TPU available", "GPU available: False")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISE)


def quiet_lightning() -> None:
    """One line per Lightning message (its own handler, not also ours), without sales tips."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.propagate = False
        logger.addFilter(_DropNoise())
        for handler in logger.handlers:
            handler.addFilter(_DropNoise())
    # Lightning 2.x's pytree helper on torch >= 2.9, once per fit: not actionable by a user
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def positional_to_options(args: list[str], stage: str, config_cls: type) -> list[str]:
    """``cpath pretrain export CKPT`` -> ``cpath pretrain --action export --ckpt_path CKPT``:
    bare words right after the stage fill the config's ``positional`` fields in order."""
    names = getattr(config_cls, "positional", ())
    at = args.index(stage) + 1
    words = []
    while at + len(words) < len(args) and not args[at + len(words)].startswith("-"):
        words.append(args[at + len(words)])
    if not words or len(words) > len(names):
        return args
    options = [x for name, word in zip(names, words, strict=False) for x in (f"--{name}", word)]
    return args[:at] + options + args[at + len(words) :]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cpath`` console script; returns the exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    quiet_lightning()
    args = list(sys.argv[1:] if argv is None else argv)
    stage = next((a for a in args if a in STAGES), None)
    if stage is None:  # help, version or a usage error: exits
        stage_list_parser().parse_args(args)
        return 2
    from pipeline.config import bool_keys, config_from_namespace, normalize_argv

    parser, loaded = build_parser([stage])
    args = positional_to_options(args, stage, loaded[stage][0])
    args = normalize_argv(args, bool_keys(loaded[stage][0]))
    namespace = parser.parse_args(args)  # prints usage and exits 2 on a bad key or value
    name = namespace.stage
    config_cls, run = loaded[name]
    cfg = config_from_namespace(config_cls, parser.instantiate(namespace)[name])
    try:
        result = run(cfg)
    except PipelineError as exc:
        print(f"cpath {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"cpath {name}: interrupted; finished outputs are kept, rerun to resume",
            file=sys.stderr,
        )
        return 130
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
