"""Shared behaviour of sub-commands whose stage is not part of this release yet."""

from __future__ import annotations

import pipeline
from pipeline.errors import PipelineError


def not_available(stage: str) -> PipelineError:
    """The error a planned stage raises: its config parses, its work is not there yet."""
    return PipelineError(
        f"`cpath {stage}` is not available in cpath-pipeline {pipeline.__version__} yet; "
        f"`cpath {stage} --help` lists the options it will take. Run `cpath info` to see "
        "what this installation provides."
    )
