"""Evaluation protocols, statistics and reports."""
