"""What every Triton matmul of llmq shares: the host wrapper (shape and dtype checks, output buffer, launch
parameters, bias), the packed-code reader, the multiply-accumulate step and the sm_90 compile helper.

Interpreter (TRITON_INTERPRET=1, CPU tensors): `tl.dot` on bf16 operands is wrong there (triton#11584), so under the
interpreter bf16 dots are done on fp32 operands (`dot_fp32`), as they are for fp32 activations.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

from .dispatch import KERNEL_DTYPES


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def read_code(row_ptrs, idx, mask, BITS: tl.constexpr):
    """Code `idx` of BITS bits (1..16) from little-endian bit-packed rows of int32 words (llmq.formats.packing: code i
    at bits [i·b, (i+1)·b)); row_ptrs and idx broadcast. When b does not divide 32 a code may continue in the next word,
    which is read only where it does (so the last word of a row is never overrun)."""
    bit = idx * BITS
    shift = (bit % 32).to(tl.uint32)
    ptrs = row_ptrs + bit // 32
    code = tl.load(ptrs, mask=mask, other=0).to(tl.uint32, bitcast=True) >> shift  # logical shift: no sign fill
    if 32 % BITS != 0:
        spill = (shift + BITS) > 32
        hi = tl.load(ptrs + 1, mask=mask & spill, other=0).to(tl.uint32, bitcast=True)
        code = code | tl.where(spill, hi << ((32 - shift) % 32), 0)
    return (code & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's [BLOCK_M, BLOCK_N] output tile (grid: M tiles, N tiles): row and column offsets, their masks."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def load_x(x_ptr, offs_m, m_mask, kk, k_mask, stride_xm):
    """The activations x[offs_m, kk] (zeros outside)."""
    return tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def store_tile(out_ptr, acc, offs_m, offs_n, m_mask, n_mask, stride_om):
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def mac(acc, x, w, GEMV: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc [BM, BN] += x [BM, BK] @ w [BN, BK]ᵀ, w in fp32: CUDA cores for one row, tensor cores otherwise."""
    if GEMV:
        acc += tl.sum(w * x.to(tl.float32), axis=1)[None, :]
    elif DOT_FP32:
        acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
    else:
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    return acc


class Launch(NamedTuple):
    """One matmul call as the kernels see it: x [M, K] with unit stride along K, the output buffer [M, N]."""

    x: torch.Tensor
    out: torch.Tensor
    m: int
    n: int
    k: int
    block_m: int  # 1: one row, multiplied and reduced on CUDA cores; 16: rows through tl.dot
    dot_fp32: bool

    def grid(self, block_n: int) -> tuple[int, int]:
        return triton.cdiv(self.m, self.block_m), triton.cdiv(self.n, block_n)

    def consts(self, block_n: int, block_k: int) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_FP32=self.dot_fp32)


def run_matmul(x: torch.Tensor, t: dict[str, torch.Tensor], cfg: dict, bias: torch.Tensor | None, transforms,
               launch: Callable[[Launch], None], out: Callable[[int, int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) -> y [..., N] in x.dtype: applies the layer's fused input `transforms` to x (None:
    built from `t` and `cfg`), flattens it to rows, allocates the output (fp32 [M, N] unless `out(m, n, x)` says
    otherwise), lets `launch` run the kernel, adds the bias."""
    from llmq.transforms import apply, build

    x = apply(build(cfg, t, fused=True) if transforms is None else transforms, x)
    k, n = cfg["in_features"], cfg["out_features"]
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"Triton matmuls take fp16, bf16 or fp32 activations, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, layer expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    o = out(m, n, x) if out is not None else torch.empty(m, n, dtype=torch.float32, device=x.device)
    if m:
        dot_fp32 = x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16)
        launch(Launch(x2, o, m, n, k, 1 if m == 1 else 16, dot_fp32))
    y = o.to(x.dtype) if o.dtype != x.dtype else o
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*lead, n)


def compile_kernel(fn, sig: dict, consts: dict, arch: int = 90, **options):
    """Compile `fn` to cubin for sm_`arch` without a GPU (Triton ships ptxas). `sig` maps each runtime argument to its
    Triton type ("*fp16", "i32", ...), `consts` the constexpr ones to their values, in the kernel's argument order."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**sig, **{k: "constexpr" for k in consts}}
    names = list(sig)
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
