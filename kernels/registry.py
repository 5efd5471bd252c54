"""Which matmul serves which llmq format. Each kernel registers its host function next to its definition
(`@register("lut")` in lut_triton.py; `@register("int", backend="torch")` for a torch reference that is more than the
format's decode + F.linear); `dispatch.quant_linear` looks the format up here. The Triton modules import triton, so
they are imported on the first Triton lookup only (CPU use never pays for triton, and never fails for lack of a GPU
driver)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

BACKENDS = ("triton", "torch")
KERNELS: dict[tuple[str, str], Callable] = {}
_triton_loaded = False


def register(*formats: str, backend: str = "triton"):
    """Decorator: `fn(x, tensors, cfg, bias, transforms)` computes y = W (T x) (+ bias) for layers of these formats,
    T = `transforms` (the layer's fused input transforms, llmq.transforms), which it applies to x first."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}")

    def deco(fn):
        for f in formats:
            if KERNELS.get((f, backend), fn) is not fn:
                raise ValueError(f"two {backend} kernels registered for format {f!r}")
            KERNELS[(f, backend)] = fn
        return fn
    return deco


def kernel_for(fmt: str, backend: str = "triton") -> Callable | None:
    global _triton_loaded
    if backend == "triton" and not _triton_loaded:
        for path in sorted(Path(__file__).parent.glob("*_triton.py")):
            importlib.import_module(f"{__package__}.{path.stem}")
        _triton_loaded = True
    return KERNELS.get((fmt, backend))
