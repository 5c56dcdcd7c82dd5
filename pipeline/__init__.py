"""Computational-pathology foundation-model pipeline."""

__version__ = "0.1.0"
