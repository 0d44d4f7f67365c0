"""Benchmark drivers and the peer baselines they are compared against."""
