"""Fused operations: each file holds an op's torch reference (and, with the gpu extra, its Triton kernel)."""
