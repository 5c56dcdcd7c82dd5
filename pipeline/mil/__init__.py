"""Multiple-instance learning aggregators and slide-level training."""
