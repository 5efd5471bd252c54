"""Packed formats: how chosen values are laid out on disk, separate from the methods that choose them.

Each format keeps the contract of `base.Format` (tensor_specs, decode, dequantize, its kernel) and registers itself
next to its definition; `get_format` reads the registry. A layer's config (stored per layer in the checkpoint) names
its format, so mixed formats coexist.

FORMAT_VERSION 2: a layer's input/output transforms are ordered lists in its config (llmq.transforms); version 1
checkpoints (rotation and lut transforms under their own keys) are still read.
"""

from . import billm, e8p, intq, lut, pbllm, ternary, vq  # noqa: F401  (each registers its format)
from .base import FORMATS, Format, register_format
from .intq import IntFormat, IntQuantized

FORMAT_VERSION = 2


def get_format(name: str) -> type[Format]:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown llmq format {name!r}; this llmq knows {sorted(FORMATS)}") from None


__all__ = ["FORMATS", "FORMAT_VERSION", "Format", "IntFormat", "IntQuantized", "get_format", "register_format"]
