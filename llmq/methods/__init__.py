"""Quantization methods: each takes a layer's weight (and, if it wants one, its input Hessian X Xᵀ)
and returns a quantized value object of some packed format. One file per method."""

from .gptq import GPTQ
from .rtn import RTN

METHODS = {m.name: m for m in (RTN(), GPTQ())}

__all__ = ["METHODS"]
