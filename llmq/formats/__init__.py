"""Packed formats: how chosen values are laid out on disk, separate from the methods that choose them.

Each format provides `tensor_specs(layer_config)` (shapes and dtypes of its tensors, so a loader can
allocate buffers before reading) and `dequantize(tensors, layer_config)` (the torch reference decode).
A layer's config (stored per layer in the checkpoint) names its format, so mixed formats coexist.
"""

from .billm import BillmFormat
from .e8p import E8PFormat
from .intq import IntFormat, IntQuantized
from .lut import LutFormat
from .pbllm import PbllmFormat
from .ternary import TernaryFormat
from .vq import VQFormat

FORMAT_VERSION = 1
FORMATS = {f.name: f for f in (IntFormat, BillmFormat, PbllmFormat, TernaryFormat, VQFormat, E8PFormat, LutFormat)}


def get_format(name: str):
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown llmq format {name!r}; this llmq knows {sorted(FORMATS)}") from None


__all__ = ["FORMATS", "FORMAT_VERSION", "IntFormat", "IntQuantized", "get_format"]
