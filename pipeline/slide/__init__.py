"""Unsupervised slide embeddings from tile features (PANTHER) and linear heads on them."""
