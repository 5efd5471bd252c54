"""Triton decode-matmul for the learned vector codebook format ("vq", llmq/formats/vq.py), reading the packed tensors
as stored:

    y = x @ Wᵀ (+ bias),   W[n, j·d + t] = C[n // R, code[n, j], t]  (· scale[n // R] for int8 codebooks)

Each program owns a [BLOCK_M, BLOCK_N] output tile and walks K in BLOCK_K steps. For the tile's weights it peels the
k-bit index of each column's vector out of the row's bit stream (index j at bits [j·k, (j+1)·k); when k does not
divide 32 an index may straddle two words, which are funnelled together), gathers the centroid coordinate
C[codebook of the row, index, column % d] (the codebook is small and stays in cache) and multiplies against x; the
codebook lookup is fused into the matmul, W is never materialised. Every row has one codebook, so an int8 codebook's
scale is applied once per output, after the K loop. Accumulation is fp32; batch 1 reduces on CUDA cores, more rows
use `tl.dot` (fp32 operands for fp32 inputs and under the interpreter, as in binary_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import register
from .triton_common import interpreting, load_x, mac, read_code, run_matmul, store_tile, tile


@triton.jit
def _vq_kernel(x_ptr, qw_ptr, cb_ptr, sc_ptr, out_ptr, M, N, K, R, stride_xm, stride_qw, stride_om,
               D: tl.constexpr, KB: tl.constexpr, NC: tl.constexpr, HAS_SCALE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    offs_m, offs_n, m_mask, n_mask = tile(M, N, BLOCK_M, BLOCK_N)
    cbi = offs_n // R  # the codebook of each output row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        m2 = n_mask[:, None] & km[None, :]
        code = read_code(qw_ptr + offs_n[:, None] * stride_qw, (kk // D)[None, :], m2, KB)  # the column's vector index
        w = tl.load(cb_ptr + (cbi[:, None] * NC + code) * D + (kk % D)[None, :], mask=m2, other=0.0).to(tl.float32)
        x = load_x(x_ptr, offs_m, m_mask, kk, km, stride_xm)
        acc = mac(acc, x, w, BLOCK_M == 1, DOT_FP32)
    if HAS_SCALE:
        s = tl.load(sc_ptr + cbi, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc * s[None, :]
    store_tile(out_ptr, acc, offs_m, offs_n, m_mask, n_mask, stride_om)


@register("vq")
def vq_matmul_triton(x: torch.Tensor, t: dict[str, torch.Tensor], cfg: dict, bias: torch.Tensor | None = None,
                     transforms=None, block_n: int = 64, block_k: int = 128) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) @ decode(t)ᵀ -> [..., N] in x.dtype, for the vq format."""
    if interpreting():
        block_n, block_k = 32, 64
    d, kb = cfg["vq_dim"], cfg["index_bits"]
    qw, cb = t["qweight"], t["codebooks"]
    sc = t.get("codebook_scales")

    def launch(a):
        _vq_kernel[a.grid(block_n)](a.x, qw, cb, cb if sc is None else sc, a.out, a.m, a.n, a.k,
                                    cfg["rows_per_codebook"] or a.n, a.x.stride(0), qw.stride(0), a.out.stride(0),
                                    D=d, KB=kb, NC=1 << kb, HAS_SCALE=sc is not None, **a.consts(block_n, block_k))

    return run_matmul(x, t, cfg, bias, transforms, launch)


def _variant(d, kb, scale, bm, dt):
    sig = {"x_ptr": f"*{dt}", "qw_ptr": "*i32", "cb_ptr": "*i8" if scale else "*fp16", "sc_ptr": "*fp16", "out_ptr": "*fp32",
           "M": "i32", "N": "i32", "K": "i32", "R": "i32", "stride_xm": "i32", "stride_qw": "i32", "stride_om": "i32"}
    consts = dict(D=d, KB=kb, NC=1 << kb, HAS_SCALE=scale, BLOCK_M=bm, BLOCK_N=64, BLOCK_K=128, DOT_FP32=dt == "fp32")
    return ("vq", (d, kb, scale, bm, dt), _vq_kernel, sig, consts, {"num_warps": 4})


# (vector dim, index bits, int8 codebook, BLOCK_M, activation dtype): GEMV and dots, straddling 12/14-bit indices
COMPILE_VARIANTS = [_variant(*v) for v in [(2, 4, False, 1, "fp16"), (4, 8, True, 16, "bf16"), (8, 12, False, 16, "fp16"),
                                           (4, 14, False, 1, "bf16")]]
