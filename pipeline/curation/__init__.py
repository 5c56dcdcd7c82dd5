"""Curation of pretraining data: hierarchical k-means of tile features and per-tile
sampling weights that balance the clusters (Vo et al., 2024, "Automatic Data Curation for
Self-Supervised Learning: A Clustering-Based Approach"; the tile-grouping rebalancing of
RudolfV, Dippel et al., 2024). ``cpath curate`` writes ``weights.h5``; ``cpath pretrain
--data.weights`` samples tiles by it."""
