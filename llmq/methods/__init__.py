"""Quantization methods: each takes a layer's weight (and, if it wants one, its input Hessian X Xᵀ) and returns a
quantized value object of some packed format. One file per method, each registering itself (llmq.methods.base);
importing them here fills METHODS (in this order)."""

from . import rtn, gptq, billm, pbllm, ternary, vq, e8p, nf4, any4, higgs  # noqa: F401  (registration)
from .base import METHODS, Calibration, Method

__all__ = ["METHODS", "Calibration", "Method"]
