"""One entry point per operation; picks the implementation from the tensors' device.

    quant_linear(x, tensors, cfg, bias)   any llmq format: int -> int_matmul; billm/pbllm/ternary -> binary_triton.py,
                                          lut (nf4/any4/higgs) -> lut_triton.py on CUDA; otherwise the format's torch
                                          decode + F.linear
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

from .reference import int_matmul_ref

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BINARY_FORMATS = ("billm", "pbllm", "ternary")  # binary_triton.py on CUDA; the torch decode + F.linear elsewhere


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
    if use_triton(x):
        from .intq_triton import int_matmul_triton

        return int_matmul_triton(x, packed, cfg, bias)
    return int_matmul_ref(x, packed, cfg, bias)


def quant_linear(x: torch.Tensor, packed: dict[str, torch.Tensor], cfg: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    if cfg["format"] == "int":
        return int_matmul(x, packed, cfg, bias)
    if cfg["format"] in BINARY_FORMATS and use_triton(x):
        from .binary_triton import binary_matmul_triton

        return binary_matmul_triton(x, packed, cfg, bias)
    if cfg["format"] == "vq" and use_triton(x):
        from .vq_triton import vq_matmul_triton

        return vq_matmul_triton(x, packed, cfg, bias)
    if cfg["format"] == "lut" and use_triton(x):  # nf4 / any4 / higgs: table lookup fused into the matmul
        from .lut_triton import lut_matmul_triton

        return lut_matmul_triton(x, packed, cfg, bias)
    if cfg["format"] == "e8p" and use_triton(x):
        from .e8p_triton import e8p_matmul_triton

        return e8p_matmul_triton(x, packed, cfg, bias)
    from llmq.formats import get_format

    w = get_format(cfg["format"]).dequantize(packed, cfg).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))



def hadamard_transform(x: torch.Tensor, hm: torch.Tensor | None = None, signs: torch.Tensor | None = None,
                       inverse: bool = False) -> torch.Tensor:
    """T (s ⊙ x) (or s ⊙ Tᵀ x) on the last dim, T = (H_m ⊗ H_p)/√n: what a rotated layer applies around its matmul."""
    if use_triton(x):
        from .hadamard import hadamard_triton

        return hadamard_triton(x, hm, signs, inverse)
    from .hadamard import hadamard_ref

    return hadamard_ref(x, hm, signs, inverse)
