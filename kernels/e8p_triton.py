"""Triton decode-matmul for the e8p format (llmq/formats/e8p.py): y = x @ Wᵀ (+ bias) with the E8P codebook lookup
fused into the matmul; W is never materialised.

Each program owns a [BLOCK_M, BLOCK_N] output tile and walks K in BLOCK_K steps (a multiple of 8). For weight (n, k) of
the tile it reads the 16-bit code c = codes[n, k // 8] (one load per 8 weights, shared through the cache) and decodes
coordinate i = k % 8 in registers from the 256-entry base table (int32 words: 2 bits per coordinate for aᵢ − ½,
bit 16 = parity of Σa; llmq.codebooks.e8p.BASE_PACKED):

    aᵢ   = ((table[c & 255] >> 2i) & 3) + ½
    neg  = bit 8+i of c                      (i < 7)
         = parity(bits 8..14 of c) ⊕ parity(Σa)   (i = 7: the parity rule of D̂8)
    w    = s₁ · (±aᵢ ± ¼)                    (bit 15 of c: the −¼ shift)

A residual stage adds s₂ times a second E8P code decoded the same way (4 bits) or the i-th coordinate of a 1-bit E8
point (3 bits: 8-bit code into a 256-entry table of packed nibbles 2xᵢ + 4). Accumulation is fp32. Batch 1
(BLOCK_M = 1) multiplies and reduces on CUDA cores; more rows use `tl.dot` (fp32 operands for fp32 inputs and under the
interpreter, where bf16 dots are wrong, triton#11584).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmq.codebooks.e8p import BASE_PACKED, E8_1BIT_PACKED

from .registry import register
from .triton_common import interpreting, load_x, mac, run_matmul, store_tile, tile

STAGE2 = {2: 0, 4: 1, 3: 2}  # bits -> second stage: none, E8P, 1-bit E8


@triton.jit
def _e8p_coord(codes_ptr, tab_ptr, rows, stride, cols, mask):
    """E8P coordinate (k % 8) of the codeword of weight (rows, cols), as fp32 (unscaled)."""
    code = tl.load(codes_ptr + rows * stride + cols // 8, mask=mask, other=0).to(tl.int32) & 0xFFFF
    pos = cols % 8
    ent = tl.load(tab_ptr + (code & 255))
    a = ((ent >> (2 * pos)) & 3).to(tl.float32) + 0.5
    sb = (code >> 8) & 127
    p = sb ^ (sb >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    neg = tl.where(pos == 7, (p ^ (ent >> 16)) & 1, (code >> (8 + pos)) & 1)
    shift = tl.where(((code >> 15) & 1) == 1, -0.25, 0.25)
    return tl.where(neg == 1, -a, a) + shift


@triton.jit
def _e8_coord(codes_ptr, tab_ptr, rows, stride, cols, mask):
    """1-bit E8 coordinate (k % 8) of the codeword of weight (rows, cols), as fp32 (unscaled)."""
    code = tl.load(codes_ptr + rows * stride + cols // 8, mask=mask, other=0).to(tl.int32) & 255
    ent = tl.load(tab_ptr + code)
    nib = (ent >> (4 * (cols % 8))) & 15
    return (nib.to(tl.float32) - 4.0) * 0.5


@triton.jit
def _e8p_kernel(x_ptr, c1_ptr, c2_ptr, t1_ptr, t2_ptr, sc_ptr, out_ptr, M, N, K, stride_xm, stride_c1, stride_c2,
                stride_om, STAGE2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_FP32: tl.constexpr):
    offs_m, offs_n, m_mask, n_mask = tile(M, N, BLOCK_M, BLOCK_N)
    s1 = tl.load(sc_ptr)
    s2 = tl.load(sc_ptr + 1) if STAGE2 > 0 else 0.0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        m2 = n_mask[:, None] & km[None, :]
        w = _e8p_coord(c1_ptr, t1_ptr, offs_n[:, None], stride_c1, kk[None, :], m2) * s1
        if STAGE2 == 1:
            w += _e8p_coord(c2_ptr, t1_ptr, offs_n[:, None], stride_c2, kk[None, :], m2) * s2
        elif STAGE2 == 2:
            w += _e8_coord(c2_ptr, t2_ptr, offs_n[:, None], stride_c2, kk[None, :], m2) * s2
        w = tl.where(m2, w, 0.0)
        x = load_x(x_ptr, offs_m, m_mask, kk, km, stride_xm)
        acc = mac(acc, x, w, BLOCK_M == 1, DOT_FP32)
    store_tile(out_ptr, acc, offs_m, offs_n, m_mask, n_mask, stride_om)


_TABLES: dict = {}


def tables(device) -> tuple[torch.Tensor, torch.Tensor]:
    """The two 256-entry int32 tables on `device` (built once per device)."""
    key = str(device)
    if key not in _TABLES:
        _TABLES[key] = (BASE_PACKED.to(device), E8_1BIT_PACKED.to(device))
    return _TABLES[key]


@register("e8p")
def e8p_matmul_triton(x: torch.Tensor, t: dict[str, torch.Tensor], cfg: dict, bias: torch.Tensor | None = None,
                      transforms=None, block_n: int = 64, block_k: int = 128) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) @ decode(t)ᵀ -> [..., N] in x.dtype, for the e8p format."""
    if interpreting():
        block_n, block_k = 32, 64
    c1 = t["codes"]
    c2 = t.get("codes2", c1)  # placeholder pointer for 2 bits (never read)

    def launch(a):
        t1, t2 = tables(a.x.device)
        _e8p_kernel[a.grid(block_n)](a.x, c1, c2, t1, t2, t["scales"].to(torch.float32), a.out, a.m, a.n, a.k,
                                     a.x.stride(0), c1.stride(0), c2.stride(0), a.out.stride(0), STAGE2=STAGE2[cfg["bits"]],
                                     **a.consts(block_n, block_k))

    return run_matmul(x, t, cfg, bias, transforms, launch)


def _variant(bits, bm, bn, bk, dt, warps):
    sig = {"x_ptr": f"*{dt}", "c1_ptr": "*i16", "c2_ptr": "*u8" if bits == 3 else "*i16", "t1_ptr": "*i32", "t2_ptr": "*i32",
           "sc_ptr": "*fp32", "out_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
           "stride_c1": "i32", "stride_c2": "i32", "stride_om": "i32"}
    consts = dict(STAGE2=STAGE2[bits], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_FP32=False)
    return ("e8p", (bits, bm, bn, bk, dt, warps), _e8p_kernel, sig, consts, {"num_warps": warps, "num_stages": 2})


# (bits, BLOCK_M, BLOCK_N, BLOCK_K, activation dtype, warps)
COMPILE_VARIANTS = [_variant(*v) for v in [(2, 1, 64, 128, "fp16", 4), (3, 16, 64, 128, "bf16", 4), (4, 64, 64, 64, "fp16", 4),
                                           (2, 64, 128, 64, "bf16", 8)]]
