"""Stain normalization and stain augmentation."""
