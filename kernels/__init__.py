"""Triton kernels for the fused adapter (being written)."""
