"""Whole-slide images: reading at a physical resolution, tissue detection, tiling, writing."""
