"""Dequant-matmul kernels, installed as ``llmq.kernels`` (never a top-level import)."""
