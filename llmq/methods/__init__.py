"""Quantization methods: each takes a layer's weight (and, if it wants one, its input Hessian X Xᵀ)
and returns a quantized value object of some packed format. One file per method."""

from .billm import BiLLM
from .e8p import E8P
from .any4 import Any4
from .gptq import GPTQ
from .higgs import HIGGS
from .nf4 import NF4
from .pbllm import PBLLM
from .rtn import RTN
from .ternary import Ternary
from .vq import VQ

METHODS = {m.name: m for m in (RTN(), GPTQ(), BiLLM(), PBLLM(), Ternary(), VQ(), E8P(), NF4(), Any4(), HIGGS())}

__all__ = ["METHODS"]
