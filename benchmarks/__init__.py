"""Benchmarks: each prints ratios against the plain shell tool, measured in the same run."""
