"""Errors that carry a message meant for the user.

The CLI prints these as one clear line (file, value, what to do) instead of a
traceback; anything else is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """Base class of every error whose message tells the user what to do."""


class ConfigError(PipelineError):
    """A configuration file or command-line override is invalid."""


class DemoDataError(PipelineError):
    """The real texture sources of the demo cohort cannot be fetched or verified."""


class SlideError(PipelineError):
    """A slide cannot be opened or read, or lacks what a stage needs (e.g. its mpp)."""
