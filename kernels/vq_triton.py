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

from .binary_triton import _mac, interpreting


@triton.jit
def _vq_kernel(x_ptr, qw_ptr, cb_ptr, sc_ptr, out_ptr, M, N, K, R, stride_xm, stride_qw, stride_om,
               D: tl.constexpr, KB: tl.constexpr, NC: tl.constexpr, HAS_SCALE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    GEMV: tl.constexpr = BLOCK_M == 1
    cbi = offs_n // R  # the codebook of each output row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        m2 = n_mask[:, None] & km[None, :]
        pos = (kk // D) * KB  # bit offset of the column's vector index in the row
        word = pos // 32
        shift = (pos % 32).to(tl.uint32)
        row = qw_ptr + offs_n[:, None] * stride_qw
        lo = tl.load(row + word[None, :], mask=m2, other=0).to(tl.uint32, bitcast=True)
        code = lo >> shift[None, :]
        if 32 % KB != 0:  # the index may continue in the next word
            straddle = (shift + KB) > 32
            hi = tl.load(row + word[None, :] + 1, mask=m2 & straddle[None, :], other=0).to(tl.uint32, bitcast=True)
            code = code | tl.where(straddle[None, :], hi << ((32 - shift) % 32)[None, :], 0)
        code = (code & ((1 << KB) - 1)).to(tl.int32)
        w = tl.load(cb_ptr + (cbi[:, None] * NC + code) * D + (kk % D)[None, :], mask=m2, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & km[None, :], other=0.0)
        acc = _mac(acc, x, w, GEMV, DOT_FP32)
    if HAS_SCALE:
        s = tl.load(sc_ptr + cbi, mask=n_mask, other=0.0).to(tl.float32)
        acc = acc * s[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])


def vq_matmul_triton(x: torch.Tensor, t: dict[str, torch.Tensor], cfg: dict, bias: torch.Tensor | None = None,
                     block_n: int = 64, block_k: int = 128) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) @ decode(t)ᵀ -> [..., N] in x.dtype, for the vq format."""
    k, n, d, kb = cfg["in_features"], cfg["out_features"], cfg["vq_dim"], cfg["index_bits"]
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, layer expects {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    if m:
        bm = 1 if m == 1 else 16
        if interpreting():
            block_n, block_k = 32, 64
        qw, cb = t["qweight"], t["codebooks"]
        sc = t.get("codebook_scales")
        grid = (triton.cdiv(m, bm), triton.cdiv(n, block_n))
        _vq_kernel[grid](x2, qw, cb, cb if sc is None else sc, out, m, n, k, cfg["rows_per_codebook"] or n,
                         x2.stride(0), qw.stride(0), out.stride(0), D=d, KB=kb, NC=1 << kb, HAS_SCALE=sc is not None,
                         BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k,
                         DOT_FP32=x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16))
    y = out.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*lead, n)
