"""One entry point per operation; picks the implementation from the tensors' device.

    quant_linear(x, tensors, cfg, bias, transforms)   any llmq format: the Triton kernel registered for the format
                                          (registry.py) on CUDA; elsewhere the format's torch reference (int:
                                          reference.int_matmul_ref; others: the format's decode + F.linear), with the
                                          layer's fused input transforms folded into the decoded weight
    int_matmul(x, tensors, cfg, bias)     Triton on CUDA, the torch reference elsewhere
    hadamard_transform(x, hm, signs, inverse)   the fused online Hadamard transform of rotated layers (hadamard.py)

On CPU, `LlmqLinear` first tries its own CPU path (cpu.py: fused int kernels or a decoded-weight cache, built once);
the torch branch here is the reference it is tested against. `LLMQ_KERNELS=torch|triton|auto` overrides the choice
(default auto; `torch` also skips the CPU path). `triton` on CPU tensors needs `TRITON_INTERPRET=1` set before
anything imports triton (that is how the tests run the kernels in CI).
Triton is imported lazily, so CPU use never pays for it and never fails for lack of a GPU driver.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from . import reference  # noqa: F401  (registers the torch reference of the int format)
from .registry import kernel_for

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(x: torch.Tensor) -> bool:
    choice = os.environ.get("LLMQ_KERNELS", "auto")
    if choice == "torch" or x.dtype not in KERNEL_DTYPES:
        return False
    if choice == "triton":
        return True
    return x.is_cuda and triton_available()


def int_matmul(x: torch.Tensor, packed: dict[str, torch.Tensor], cfg: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ Wᵀ (+ bias) for an int-format layer, without materialising W on the Triton path."""
    return quant_linear(x, packed, cfg, bias)


def quant_linear(x: torch.Tensor, packed: dict[str, torch.Tensor], cfg: dict, bias: torch.Tensor | None = None,
                 transforms=None) -> torch.Tensor:
    """y = W (T x) (+ bias) for a packed layer, T the layer's fused input transforms (`transforms`: built objects,
    llmq.transforms, as LlmqLinear caches them; None: built from `packed` and `cfg`)."""
    from llmq.transforms import build, fold_inputs

    if transforms is None:
        transforms = build(cfg, packed, fused=True)
    kernel = (kernel_for(cfg["format"], "triton") if use_triton(x) else None) or kernel_for(cfg["format"], "torch")
    if kernel is not None:
        return kernel(x, packed, cfg, bias, transforms)
    from llmq.formats import get_format

    w = fold_inputs(get_format(cfg["format"]).decode(packed, cfg), transforms).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def hadamard_transform(x: torch.Tensor, hm: torch.Tensor | None = None, signs: torch.Tensor | None = None,
                       inverse: bool = False) -> torch.Tensor:
    """T (s ⊙ x) (or s ⊙ Tᵀ x) on the last dim, T = (H_m ⊗ H_p)/√n: what a rotated layer applies around its matmul."""
    if use_triton(x):
        from .hadamard import hadamard_triton

        return hadamard_triton(x, hm, signs, inverse)
    from .hadamard import hadamard_ref

    return hadamard_ref(x, hm, signs, inverse)
