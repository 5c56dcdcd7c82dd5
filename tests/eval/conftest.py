"""Fixtures of the evaluate tests: the MIL tests' planted cohort (feature files with a
planted tumour signal, slide labels and tile labels) for fast slide tasks."""

from tests.mil.test_training import planted  # noqa: F401
