"""Benchmarks: scripts that print their figures (medians and ratios from the same run)."""
