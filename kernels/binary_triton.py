"""Triton matmuls for the binary and ternary formats (billm, pbllm, ternary), reading the packed tensors as stored.

    y = x @ Wᵀ (+ bias), W decoded on the fly tile by tile (llmq/formats/{billm,pbllm,ternary}.py)

Each program owns a [BLOCK_M, BLOCK_N] output tile and walks K:
- dense plane: the sign bits (billm, pbllm) or base-3 trit bytes (ternary) of a [BLOCK_N, BLOCK_K] tile are unpacked
  in registers (bit k%32 of word k//32; digit k%5 of byte k//5) and multiplied against x. For billm the dense plane
  is ±1 with one scale per row (α_c), so the scale is applied once, after the K loop.
- billm salient columns: a second pass over the S salient columns gathers their x values and adds
  ((α_a − α_c) σ1 + α_b σ2) for the compact residual sign plane.
- sparse lists (billm's sparse group, pbllm's 8-bit weights): r fixed slots per row and 128-column block; each slot
  adds x[:, col] · (value − dense value) for its row, empty slots (offset 255) add nothing.
Accumulation is fp32. Batch 1 (BLOCK_M = 1) multiplies and reduces on CUDA cores; more rows use `tl.dot` (fp32
operands, IEEE, for fp32 inputs and under the interpreter, where bf16 dots are wrong, triton#11584).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .registry import register
from .triton_common import interpreting, load_x, mac, read_code, run_matmul, store_tile, tile


@triton.jit
def _sign_bits(ptr, rows, stride, cols, mask):
    """±1 (fp32) from a sign plane (1-bit codes) at [rows, cols] (broadcast index tensors)."""
    return (read_code(ptr + rows * stride, cols, mask, 1) * 2 - 1).to(tl.float32)


@triton.jit
def _billm_kernel(x_ptr, sg_ptr, sal_ptr, s2_ptr, sp_ptr, sc_ptr, out_ptr,
                  M, N, K, S, NB, stride_xm, stride_sg, stride_s2, stride_om,
                  R: tl.constexpr, BLK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, DOT_FP32: tl.constexpr):
    offs_m, offs_n, m_mask, n_mask = tile(M, N, BLOCK_M, BLOCK_N)
    GEMV: tl.constexpr = BLOCK_M == 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        s = _sign_bits(sg_ptr, offs_n[:, None], stride_sg, kk[None, :], n_mask[:, None] & km[None, :])
        x = load_x(x_ptr, offs_m, m_mask, kk, km, stride_xm)
        acc = mac(acc, x, s, GEMV, DOT_FP32)
    a_c = tl.load(sc_ptr + offs_n * 4 + 0, mask=n_mask, other=0.0).to(tl.float32)
    a_s = tl.load(sc_ptr + offs_n * 4 + 1, mask=n_mask, other=0.0).to(tl.float32)
    a_a = tl.load(sc_ptr + offs_n * 4 + 2, mask=n_mask, other=0.0).to(tl.float32)
    a_b = tl.load(sc_ptr + offs_n * 4 + 3, mask=n_mask, other=0.0).to(tl.float32)
    acc = acc * a_c[None, :]
    for j0 in range(0, S, BLOCK_S):  # salient columns: first-basis scale correction + residual basis
        jj = j0 + tl.arange(0, BLOCK_S)
        jm = jj < S
        col = tl.load(sal_ptr + jj, mask=jm, other=0).to(tl.int32) & 0xFFFF
        m2 = n_mask[:, None] & jm[None, :]
        s1 = _sign_bits(sg_ptr, offs_n[:, None], stride_sg, col[None, :], m2)
        s2 = _sign_bits(s2_ptr, offs_n[:, None], stride_s2, jj[None, :], m2)
        wc = tl.where(m2, (a_a - a_c)[:, None] * s1 + a_b[:, None] * s2, 0.0)
        xg = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :], mask=m_mask[:, None] & jm[None, :], other=0.0)
        acc = mac(acc, xg, wc, GEMV, DOT_FP32)
    for b in range(0, NB):  # sparse group: α_s instead of α_c at r listed positions per row and block
        for r in tl.static_range(R):
            off = tl.load(sp_ptr + offs_n * (NB * R) + b * R + r, mask=n_mask, other=255).to(tl.int32)
            valid = n_mask & (off != 255)
            col = tl.where(valid, b * BLK + off, 0)
            s1 = _sign_bits(sg_ptr, offs_n, stride_sg, col, valid)
            coef = tl.where(valid, (a_s - a_c) * s1, 0.0)
            xg = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :], mask=m_mask[:, None] & valid[None, :], other=0.0)
            acc += xg.to(tl.float32) * coef[None, :]
    store_tile(out_ptr, acc, offs_m, offs_n, m_mask, n_mask, stride_om)


@triton.jit
def _pbllm_kernel(x_ptr, sg_ptr, sc_ptr, sp_ptr, q_ptr, s8_ptr, out_ptr,
                  M, N, K, NB, stride_xm, stride_sg, stride_sc, stride_om,
                  GS: tl.constexpr, R: tl.constexpr, BLK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    offs_m, offs_n, m_mask, n_mask = tile(M, N, BLOCK_M, BLOCK_N)
    GEMV: tl.constexpr = BLOCK_M == 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        m2 = n_mask[:, None] & km[None, :]
        s = _sign_bits(sg_ptr, offs_n[:, None], stride_sg, kk[None, :], m2)
        g = kk // GS if GS > 0 else kk * 0
        a = tl.load(sc_ptr + offs_n[:, None] * stride_sc + g[None, :], mask=m2, other=0.0).to(tl.float32)
        x = load_x(x_ptr, offs_m, m_mask, kk, km, stride_xm)
        acc = mac(acc, x, s * a, GEMV, DOT_FP32)
    s8 = tl.load(s8_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    for b in range(0, NB):  # 8-bit salient weights replace the binarized value at their positions
        for r in tl.static_range(R):
            slot = offs_n * (NB * R) + b * R + r
            off = tl.load(sp_ptr + slot, mask=n_mask, other=255).to(tl.int32)
            valid = n_mask & (off != 255)
            col = tl.where(valid, b * BLK + off, 0)
            q = tl.load(q_ptr + slot, mask=valid, other=0).to(tl.float32)
            s1 = _sign_bits(sg_ptr, offs_n, stride_sg, col, valid)
            g = col // GS if GS > 0 else col * 0
            a = tl.load(sc_ptr + offs_n * stride_sc + g, mask=valid, other=0.0).to(tl.float32)
            coef = tl.where(valid, s8 * q - a * s1, 0.0)
            xg = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :], mask=m_mask[:, None] & valid[None, :], other=0.0)
            acc += xg.to(tl.float32) * coef[None, :]
    store_tile(out_ptr, acc, offs_m, offs_n, m_mask, n_mask, stride_om)


@triton.jit
def _ternary_kernel(x_ptr, qw_ptr, sc_ptr, out_ptr, M, N, K, stride_xm, stride_qw, stride_sc, stride_om,
                    GS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_FP32: tl.constexpr):
    offs_m, offs_n, m_mask, n_mask = tile(M, N, BLOCK_M, BLOCK_N)
    GEMV: tl.constexpr = BLOCK_M == 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        m2 = n_mask[:, None] & km[None, :]
        byte = tl.load(qw_ptr + offs_n[:, None] * stride_qw + (kk // 5)[None, :], mask=m2, other=0).to(tl.int32)
        p = kk % 5
        pow3 = tl.where(p == 0, 1, tl.where(p == 1, 3, tl.where(p == 2, 9, tl.where(p == 3, 27, 81))))
        t = ((byte // pow3[None, :]) % 3 - 1).to(tl.float32)
        g = kk // GS if GS > 0 else kk * 0
        a = tl.load(sc_ptr + offs_n[:, None] * stride_sc + g[None, :], mask=m2, other=0.0).to(tl.float32)
        x = load_x(x_ptr, offs_m, m_mask, kk, km, stride_xm)
        acc = mac(acc, x, t * a, GEMV, DOT_FP32)
    store_tile(out_ptr, acc, offs_m, offs_n, m_mask, n_mask, stride_om)


@register("billm", "pbllm", "ternary")
def binary_matmul_triton(x: torch.Tensor, t: dict[str, torch.Tensor], cfg: dict, bias: torch.Tensor | None = None,
                         transforms=None, block_n: int = 64, block_k: int = 128) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) @ decode(t)ᵀ -> [..., N] in x.dtype, for the billm / pbllm / ternary formats."""
    if interpreting():
        block_n, block_k = 32, 64
    fmt = cfg["format"]
    if fmt not in ("billm", "pbllm", "ternary"):
        raise ValueError(f"no binary kernel for format {fmt!r}")
    gs = cfg.get("group_size") or 0

    def launch(a):
        grid, common = a.grid(block_n), a.consts(block_n, block_k)
        if fmt == "billm":
            s, r = cfg["salient_columns"], cfg["sparse_per_block"]
            sg, s2 = t["signs"], t["signs2"]
            sp = t.get("sparse_idx", sg)  # placeholder pointer when r = 0 (never read)
            _billm_kernel[grid](a.x, sg, t["salient_idx"] if s else sg, s2 if s else sg, sp, t["scales"], a.out, a.m, a.n,
                                a.k, s, sp.shape[1] if r else 0, a.x.stride(0), sg.stride(0), s2.stride(0) if s else 0,
                                a.out.stride(0), R=r, BLK=gs or 128, BLOCK_S=32, **common)
        elif fmt == "pbllm":
            sg, sc, sp = t["signs"], t["scales"], t["sparse_idx"]
            _pbllm_kernel[grid](a.x, sg, sc, sp, t["sparse_q"], t["sparse_scale"], a.out, a.m, a.n, a.k, sp.shape[1],
                                a.x.stride(0), sg.stride(0), sc.stride(0), a.out.stride(0),
                                GS=0 if gs >= a.k else gs, R=sp.shape[2], BLK=cfg.get("block", 128), **common)
        else:
            qw, sc = t["qweight"], t["scales"]
            _ternary_kernel[grid](a.x, qw, sc, a.out, a.m, a.n, a.k, a.x.stride(0), qw.stride(0), sc.stride(0),
                                  a.out.stride(0), GS=0 if gs >= a.k else gs, **common)

    return run_matmul(x, t, cfg, bias, transforms, launch)


_COMMON_SIG = {"M": "i32", "N": "i32", "K": "i32"}


def _variant(fmt, bm, dt, gs=0, r=2):
    """One compile-check variant of the billm / pbllm / ternary kernel (BLOCK_N 64, BLOCK_K 128)."""
    x, o = {"x_ptr": f"*{dt}"}, {"out_ptr": "*fp32"}
    tail = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=128)
    if fmt == "billm":
        sig = {**x, "sg_ptr": "*i32", "sal_ptr": "*i16", "s2_ptr": "*i32", "sp_ptr": "*u8", "sc_ptr": "*fp16", **o,
               **_COMMON_SIG, "S": "i32", "NB": "i32", "stride_xm": "i32", "stride_sg": "i32", "stride_s2": "i32",
               "stride_om": "i32"}
        consts, fn = dict(R=r, BLK=128, **tail, BLOCK_S=32, DOT_FP32=dt == "fp32"), _billm_kernel
    elif fmt == "pbllm":
        sig = {**x, "sg_ptr": "*i32", "sc_ptr": "*fp16", "sp_ptr": "*u8", "q_ptr": "*i8", "s8_ptr": "*fp16", **o,
               **_COMMON_SIG, "NB": "i32", "stride_xm": "i32", "stride_sg": "i32", "stride_sc": "i32", "stride_om": "i32"}
        consts, fn = dict(GS=gs, R=r, BLK=128, **tail, DOT_FP32=dt == "fp32"), _pbllm_kernel
    else:
        sig = {**x, "qw_ptr": "*u8", "sc_ptr": "*fp16", **o, **_COMMON_SIG, "stride_xm": "i32", "stride_qw": "i32",
               "stride_sc": "i32", "stride_om": "i32"}
        consts, fn = dict(GS=gs, **tail, DOT_FP32=dt == "fp32"), _ternary_kernel
    return (fmt, (bm, dt, gs, r), fn, sig, consts, {"num_warps": 4})


# GEMV and 16-row dots of each kernel, groups and sparse slots included
COMPILE_VARIANTS = [_variant("billm", 1, "fp16"), _variant("billm", 16, "bf16", r=0), _variant("pbllm", 1, "bf16", gs=64),
                    _variant("pbllm", 16, "fp16", gs=0), _variant("ternary", 1, "fp16", gs=64),
                    _variant("ternary", 16, "bf16", gs=0)]
