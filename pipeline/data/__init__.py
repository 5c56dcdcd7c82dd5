"""Data: real texture sources, the demo cohort, and (later) tile and bag datasets."""
