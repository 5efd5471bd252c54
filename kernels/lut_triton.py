"""Triton decode-matmul for the lookup-table format ("lut": NF4, any4, HIGGS), reading the packed tensors as stored.

    y = x @ Wᵀ (+ bias),   W̃[n, k] = scale[n, k // g] · table[code(n, k // d), k mod d]      (llmq/formats/lut.py)

Each program owns a [BLOCK_M, BLOCK_N] output tile and walks K in BLOCK_K steps. For every weight of the
[BLOCK_N, BLOCK_K] tile it extracts its code from the bit-packed row (code i of a row at bits [i·b, (i+1)·b);
when b divides 32 one word holds the whole code, otherwise the word and the next are joined in 64 bits), looks
the value up in the table (a shared [T, d] table, or the row's own [T] table for any4: both tiny and cache
resident, so the lookup is a gather from L1), multiplies by the group's scale and accumulates against x.
The table lookup is fused into the matmul: W is never written out. Accumulation is fp32; batch 1 (BLOCK_M = 1)
multiplies and reduces on CUDA cores, more rows use `tl.dot` (fp32 operands, IEEE, for fp32 inputs and under
the interpreter, where bf16 dots are wrong, triton#11584).

Rotated layers (HIGGS): the layer's fused input transforms (column scale c, Hadamard rotation V: llmq.transforms)
are applied to x first (the fused Triton Hadamard transform on CUDA), then the kernel computes W̃ (V (c ⊙ x)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import register
from .triton_common import interpreting, load_x, mac, read_code, run_matmul, store_tile, tile


@triton.jit
def _lut_kernel(x_ptr, qw_ptr, sc_ptr, tb_ptr, out_ptr, M, N, K, stride_xm, stride_qw, stride_sc, stride_tb, stride_om,
                CB: tl.constexpr, D: tl.constexpr, GS: tl.constexpr, ROW_TABLE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    offs_m, offs_n, m_mask, n_mask = tile(M, N, BLOCK_M, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        m2 = n_mask[:, None] & km[None, :]
        code = read_code(qw_ptr + offs_n[:, None] * stride_qw, (kk // D)[None, :], m2, CB)  # one code per D columns
        if ROW_TABLE:
            v = tl.load(tb_ptr + offs_n[:, None] * stride_tb + code, mask=m2, other=0.0)
        else:
            v = tl.load(tb_ptr + code * D + (kk % D)[None, :], mask=m2, other=0.0)
        g = kk // GS if GS > 0 else kk * 0
        s = tl.load(sc_ptr + offs_n[:, None] * stride_sc + g[None, :], mask=m2, other=0.0)
        w = v.to(tl.float32) * s.to(tl.float32)
        x = load_x(x_ptr, offs_m, m_mask, kk, km, stride_xm)
        acc = mac(acc, x, w, BLOCK_M == 1, DOT_FP32)
    store_tile(out_ptr, acc, offs_m, offs_n, m_mask, n_mask, stride_om)


@register("lut")
def lut_matmul_triton(x: torch.Tensor, t: dict[str, torch.Tensor], cfg: dict, bias: torch.Tensor | None = None,
                      transforms=None, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) @ Wᵀ -> [..., N] in x.dtype for a "lut" layer, after its fused input `transforms`."""
    if interpreting():
        block_n, block_k = 32, 32
    k, d, gs = cfg["in_features"], cfg["dim"], cfg["group_size"] or 0
    qw, sc, tb = t["qweight"], t["scales"], t["table"]

    def launch(a):
        _lut_kernel[a.grid(block_n)](a.x, qw, sc, tb, a.out, a.m, a.n, a.k, a.x.stride(0), qw.stride(0), sc.stride(0),
                                     tb.stride(0), a.out.stride(0), CB=cfg["bits"] * d, D=d, GS=0 if gs >= k else gs,
                                     ROW_TABLE=cfg["table"] == "row", **a.consts(block_n, block_k))

    return run_matmul(x, t, cfg, bias, transforms, launch)


def _variant(cb, d, gs, row, bm, dt):
    sig = {"x_ptr": f"*{dt}", "qw_ptr": "*i32", "sc_ptr": "*fp16", "tb_ptr": "*fp16", "out_ptr": "*fp32", "M": "i32", "N": "i32",
           "K": "i32", "stride_xm": "i32", "stride_qw": "i32", "stride_sc": "i32", "stride_tb": "i32", "stride_om": "i32"}
    consts = dict(CB=cb, D=d, GS=gs, ROW_TABLE=row, BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64, DOT_FP32=dt == "fp32")
    return ("lut", (cb, d, gs, row, bm, dt), _lut_kernel, sig, consts, {"num_warps": 4})


# (code bits, d, group size, row table, BLOCK_M, activation dtype): GEMV and 16-row dots; straddling 3/6-bit codes
COMPILE_VARIANTS = [_variant(*v) for v in [(4, 1, 64, False, 1, "fp16"), (4, 1, 128, True, 1, "bf16"),
                                           (8, 2, 128, False, 16, "bf16"), (6, 2, 128, False, 16, "fp16"),
                                           (3, 1, 64, False, 16, "fp32")]]
