"""The contract every packed format keeps, and the registry `get_format` reads.

A format is a class registered with `@register_format` next to its definition; it provides

    name                          the layer config's "format"
    tensor_specs(cfg)             shapes and dtypes of its tensors (a loader allocates buffers before reading)
    decode(tensors, cfg)          torch: the weight its kernel multiplies, fp32 [out, in]
    dequantize(tensors, cfg)      decode with the layer's fused input transforms folded in (llmq.transforms):
                                  the weight in the basis of the layer's packed matmul; differentiable in the
                                  float tensors (scales, tables, codebooks), so a method can fine-tune them
    kernel(backend)               the matmul registered for it in llmq.kernels (None: decode + F.linear)
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..transforms import build, fold_inputs

FORMATS: dict[str, type["Format"]] = {}


class Format(ABC):
    name: str

    @staticmethod
    @abstractmethod
    def tensor_specs(cfg: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]: ...

    @staticmethod
    @abstractmethod
    def decode(t: dict[str, torch.Tensor], cfg: dict) -> torch.Tensor: ...

    @classmethod
    def dequantize(cls, t: dict[str, torch.Tensor], cfg: dict) -> torch.Tensor:
        return fold_inputs(cls.decode(t, cfg), build(cfg, t, fused=True))

    @classmethod
    def kernel(cls, backend: str = "triton"):
        from ..kernels.registry import kernel_for

        return kernel_for(cls.name, backend)


def register_format(cls: type[Format]) -> type[Format]:
    if not (isinstance(cls, type) and issubclass(cls, Format)) or getattr(cls, "__abstractmethods__", None):
        raise TypeError(f"{cls!r} does not implement the llmq Format contract")
    if FORMATS.get(cls.name, cls) is not cls:
        raise ValueError(f"two formats named {cls.name!r}")
    FORMATS[cls.name] = cls
    return cls
