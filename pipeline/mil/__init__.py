"""Slide-level multiple-instance learning: aggregators by name (``pipeline.mil.base.make_mil``)."""
