"""Triton dequant-matmul for the int format, reading the on-disk packing directly (no repack).

    y[m, n] = Σ_k x[m, k] · W[n, k],   W[n, k] = scale[n, g(k)] · (code[n, k] − zero[n, g(k)])

Layout (what `llmq/formats/packing.py` writes, = compressed-tensors `pack-quantized`): row n of `qweight` is the
little-endian bit stream of codes k = 0..K−1, code k at bits [k·b, (k+1)·b), in int32 words.

Why no load-time repack: when b divides 32 (2, 4, 8 bits) word j of a row holds codes j·P .. j·P+P−1
(P = 32/b) and nothing straddles, so a tile of words [BLOCK_N, BLOCK_K/P] is one contiguous, vectorisable
load per row; we then peel sub-position i (codes k ≡ i mod P) with one shift and multiply it against the
matching strided slice of x. The sum over k splits exactly into P sums over sub-positions, so there is no
in-register reshape or transpose of codes, and the GPU reads exactly the bytes on disk (size claims hold,
no second copy). Other widths (3, 5, 6, 7 bits: codes straddle words) take a generic path that gathers,
per code, its word and the next one and funnels the bits together.

Two launch shapes:
- decode (M ≤ 16): memory-bound. BLOCK_M = 1 is a GEMV (multiply + row reduction, no tensor cores); 2–16
  rows use one 16-row `tl.dot`. Split-K spreads K across programs (so N/BLOCK_N × SPLIT_K programs fill the
  GPU at batch 1) and adds partial sums into an fp32 buffer with atomics.
- prefill (M > 16): a tiled GEMM with grouped tile order for L2 reuse; `tl.dot` with fp32 accumulation.
Both are autotuned (configs keyed by a bucket of M, N, K, bits, group size, act-order).

Scales and zero points: when the K tile lies inside one group (no act-order and BLOCK_K divides the group
size, or per-channel), they are loaded once per tile as a [BLOCK_N] vector; otherwise (act-order, groups
smaller than the tile) gathered per code from the small, cache-resident [N, n_groups] tables. A shorter last
group needs nothing special: g(k) = k // group_size and masks stop at K.

Interpreter: bf16 dots run on fp32 operands (DOT_FP32, triton_common.py). The weight is always rounded to the
activation dtype first, exactly as the torch reference does, so both see the same weights.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .registry import register
from .triton_common import interpreting, read_code, run_matmul

MAGIC = tl.constexpr(0x4B000000)  # the fp32 bit pattern of 2^23: (MAGIC | c) reinterpreted is exactly 2^23 + c for 0 <= c < 2^23
MAGIC_F = tl.constexpr(8388608.0)


@triton.jit
def _codes_minus_zero(c, zf):
    """c - z in fp32 for integer codes c, with zf = z + 2^23: an OR and a subtraction instead of a slow int->float
    conversion (both results are exact small integers)."""
    return (c | MAGIC).to(tl.float32, bitcast=True) - zf


@triton.jit
def _dequant_tile(c, kk, kmask, offs_n, n_mask, s_ptr, z_ptr, g_ptr, stride_s, stride_z, s_vec, zf_vec,
                  BITS: tl.constexpr, GS: tl.constexpr, ACT_ORDER: tl.constexpr, HAS_ZERO: tl.constexpr,
                  GROUP_CONST: tl.constexpr):
    """codes c [BN, BKx] (int32) for input columns kk [BKx] -> fp32 weights [BN, BKx]."""
    if GROUP_CONST:
        w = _codes_minus_zero(c, zf_vec[:, None]) * s_vec[:, None]
    else:
        if ACT_ORDER:
            g = tl.load(g_ptr + kk, mask=kmask, other=0)
        elif GS == 0:
            g = kk * 0
        else:
            g = kk // GS
        m2 = n_mask[:, None] & kmask[None, :]
        s = tl.load(s_ptr + offs_n[:, None] * stride_s + g[None, :], mask=m2, other=0.0).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + offs_n[:, None] * stride_z + g[None, :], mask=m2, other=0).to(tl.float32)
            w = _codes_minus_zero(c, z + MAGIC_F) * s
        else:
            w = _codes_minus_zero(c, MAGIC_F + (1 << (BITS - 1))) * s
    return w


@triton.jit
def _int_matmul_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, out_ptr,
    M, N, K, W,
    stride_xm, stride_qn, stride_s, stride_z, stride_om,
    M_BUCKET,  # autotune key only
    BITS: tl.constexpr, GS: tl.constexpr, ACT_ORDER: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, GROUP_CONST: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M consecutive M tiles share each N tile's weights while they are in L2.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    FAST: tl.constexpr = 32 % BITS == 0  # no code straddles two words
    P: tl.constexpr = 32 // BITS if FAST else 1  # codes per word (fast path)
    KX: tl.constexpr = BLOCK_K // P  # columns handled per step
    GEMV: tl.constexpr = BLOCK_M == 1
    MASK: tl.constexpr = (1 << BITS) - 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, KX), dtype=tl.float32)  # GEMV: elementwise partial sums, reduced once at the end

    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # a multiple of BLOCK_K, so tiles align to groups
    k_start = pid_k * k_per
    k_end = tl.minimum(k_start + k_per, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        s_vec = tl.zeros((BLOCK_N,), dtype=tl.float32)
        zf_vec = tl.zeros((BLOCK_N,), dtype=tl.float32) + MAGIC_F
        if GROUP_CONST:  # the whole tile is in one group: one scale (and zero) per output row
            if GS == 0:
                g0 = 0
            else:
                g0 = k0 // GS
            s_vec = tl.load(s_ptr + offs_n * stride_s + g0, mask=n_mask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                zf_vec += tl.load(z_ptr + offs_n * stride_z + g0, mask=n_mask, other=0).to(tl.float32)
            else:
                zf_vec += 1 << (BITS - 1)
        tile = tl.zeros((BLOCK_N, KX), dtype=tl.float32)  # GEMV + one group per tile: Σ (c - z)·x, scaled once
        if FAST:
            # Word j holds codes j*P .. j*P+P-1: one contiguous load of BLOCK_K/P words per row.
            offs_w = k0 // P + tl.arange(0, KX)
            words = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_w[None, :],
                            mask=n_mask[:, None] & (offs_w < W)[None, :], other=0)
        for i in tl.static_range(P):
            if FAST:
                kk = k0 + tl.arange(0, KX) * P + i  # the codes at sub-position i of each word
                c = (words >> (i * BITS)) & MASK  # arithmetic shift is harmless: i*BITS + BITS <= 32, then masked
            else:
                kk = k0 + tl.arange(0, KX)  # codes straddle words: read one by one
                c = read_code(qw_ptr + offs_n[:, None] * stride_qn, kk[None, :], n_mask[:, None] & (kk < K)[None, :], BITS)
            kmask = kk < K
            xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & kmask[None, :], other=0.0)
            if GEMV and GROUP_CONST:
                tile += _codes_minus_zero(c, zf_vec[:, None]) * xk.to(tl.float32)
            else:
                w = _dequant_tile(c, kk, kmask, offs_n, n_mask, s_ptr, z_ptr, g_ptr, stride_s, stride_z, s_vec, zf_vec,
                                  BITS, GS, ACT_ORDER, HAS_ZERO, GROUP_CONST)
                if GEMV:  # CUDA cores; the fp32 weight is used unrounded (within the output dtype's tolerance)
                    acc2 += w * xk.to(tl.float32)
                elif DOT_FP32:
                    w = w.to(x_ptr.dtype.element_ty).to(tl.float32)  # round as the reference does
                    acc += tl.dot(xk.to(tl.float32), tl.trans(w), input_precision="ieee")
                else:
                    acc += tl.dot(xk, tl.trans(w.to(x_ptr.dtype.element_ty)))
        if GEMV and GROUP_CONST:
            acc += (tl.sum(tile, axis=1) * s_vec)[None, :]
    if GEMV and not GROUP_CONST:
        acc += tl.sum(acc2, axis=1)[None, :]

    o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.atomic_add(o_ptrs, acc, mask=o_mask)


def _group_const(nargs) -> bool:
    gs, bk = nargs["GS"], nargs["BLOCK_K"]
    return (not nargs["ACT_ORDER"]) and (gs == 0 or gs % bk == 0)


_kernel = triton.heuristics({"GROUP_CONST": _group_const})(_int_matmul_kernel)

DECODE_MAX_M = 16
KEY = ["M_BUCKET", "N", "K", "BITS", "GS", "ACT_ORDER", "HAS_ZERO"]


def _min_block_k(bits: int, dot: bool) -> int:
    """Smallest legal BLOCK_K: a GPU tl.dot needs K ≥ 16, and the fast path's dot K is BLOCK_K / (32/b)."""
    if not dot:
        return 32
    return 16 * (32 // bits) if 32 % bits == 0 else 16


def _configs(mode: str, bits: int) -> list[triton.Config]:
    cfgs = []
    if mode == "gemv":
        for bn in (32, 64, 128):
            for bk in (128, 256, 512):
                for sk in (1, 2, 4, 8, 16):
                    warps = 4 if bn * bk <= 16384 else 8
                    cfgs.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "GROUP_M": 1}, num_warps=warps, num_stages=2))
        # keep the search small: typical winners have many programs in flight
        cfgs = [c for c in cfgs if c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] in (8192, 16384, 32768)]
    elif mode == "decode":
        for bn in (32, 64, 128):
            for bk in (128, 256):
                for sk in (1, 4, 8, 16):
                    cfgs.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "GROUP_M": 1}, num_warps=4, num_stages=3))
    else:
        for bm, bn, bk, warps, stages in [
            (64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3),
            (64, 128, 128, 4, 3), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3), (64, 256, 128, 8, 3),
            (128, 128, 256, 8, 2), (64, 64, 256, 4, 3), (128, 256, 128, 8, 2), (32, 64, 128, 4, 4),
            (64, 128, 256, 4, 3), (128, 64, 256, 8, 2),
        ]:
            cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1, "GROUP_M": 8}, num_warps=warps, num_stages=stages))
    kmin = _min_block_k(bits, dot=mode != "gemv")
    return [c for c in cfgs if c.kwargs["BLOCK_K"] >= kmin]


@functools.lru_cache(maxsize=None)
def _tuned(mode: str, bits: int):
    reset = ["out_ptr"] if mode != "prefill" else None
    return triton.autotune(configs=_configs(mode, bits), key=KEY, reset_to_zero=reset)(_kernel)


def _mode(m: int) -> str:
    return "gemv" if m == 1 else ("decode" if m <= DECODE_MAX_M else "prefill")


@register("int")
def int_matmul_triton(x: torch.Tensor, t: dict[str, torch.Tensor], cfg: dict, bias: torch.Tensor | None = None,
                      transforms=None, config: dict | None = None) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) @ dequant(t)ᵀ -> [..., N] in x.dtype.

    `config` fixes the launch parameters (BLOCK_N, BLOCK_K, SPLIT_K, optional BLOCK_M/GROUP_M) instead of
    autotuning; the interpreter always uses a fixed small configuration."""
    bits, gs, k = cfg["bits"], cfg["group_size"] or 0, cfg["in_features"]
    qw, sc = t["qweight"], t["scales"]
    zp = t.get("qzeros")
    gi = t.get("g_idx")
    has_zero, act_order = zp is not None, gi is not None
    if gs and gs >= k:
        gs = 0  # one group per row
    state = {}

    def out(m, n, x):
        mode = state["mode"] = _mode(m)
        cfg_ = config
        if cfg_ is None and interpreting():
            cfg_ = {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2 if mode != "prefill" else 1}
        state["config"] = cfg_
        atomic = mode != "prefill" or (cfg_ or {}).get("SPLIT_K", 1) > 1  # partial sums are added into an fp32 buffer
        if atomic:
            return torch.zeros(m, n, dtype=torch.float32, device=x.device)
        return torch.empty(m, n, dtype=x.dtype, device=x.device)

    def launch(a):
        mode, c = state["mode"], state["config"]
        dummy = qw  # placeholder pointer for absent zero points / g_idx (never read)
        args = (a.x, qw, sc, zp if has_zero else dummy, gi if act_order else dummy, a.out,
                a.m, a.n, a.k, qw.shape[1], a.x.stride(0), qw.stride(0), sc.stride(0), zp.stride(0) if has_zero else 0,
                a.out.stride(0), min(triton.next_power_of_2(a.m), 4096))
        consts = dict(BITS=bits, GS=gs, ACT_ORDER=act_order, HAS_ZERO=has_zero, DOT_FP32=a.dot_fp32)
        if c is not None:
            c = {"BLOCK_M": a.block_m, "GROUP_M": 1 if mode != "prefill" else 8, **c}
            grid = (triton.cdiv(a.m, c["BLOCK_M"]) * triton.cdiv(a.n, c["BLOCK_N"]), c["SPLIT_K"])
            _kernel[grid](*args, **consts, **c)
        else:
            kernel = _tuned(mode, bits)
            if mode != "prefill":
                consts["BLOCK_M"] = a.block_m
            grid = lambda meta: (triton.cdiv(a.m, meta["BLOCK_M"]) * triton.cdiv(a.n, meta["BLOCK_N"]), meta["SPLIT_K"])  # noqa: E731
            kernel[grid](*args, **consts)

    return run_matmul(x, t, cfg, bias, transforms, launch, out=out)


def _variant(bits, gs, act, zero, bm, bn, bk, sk, dt, warps, stages):
    atomic = sk > 1 or bm <= 16
    sig = {"x_ptr": f"*{dt}", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8" if zero else "*i32", "g_ptr": "*i32",
           "out_ptr": "*fp32" if atomic else f"*{dt}", "M": "i32", "N": "i32", "K": "i32", "W": "i32", "stride_xm": "i32",
           "stride_qn": "i32", "stride_s": "i32", "stride_z": "i32", "stride_om": "i32", "M_BUCKET": "i32"}
    consts = dict(BITS=bits, GS=gs, ACT_ORDER=act, HAS_ZERO=zero, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk,
                  GROUP_M=1 if bm <= 16 else 8, DOT_FP32=False, GROUP_CONST=(not act) and (gs == 0 or gs % bk == 0))
    return ("int", (bits, gs, act, zero, bm, bn, bk, sk, dt), _int_matmul_kernel, sig, consts,
            {"num_warps": warps, "num_stages": stages})


# (bits, group size, act-order, zero points, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, activation dtype, warps, stages)
COMPILE_VARIANTS = [_variant(*v) for v in [
    (4, 128, False, False, 1, 64, 256, 8, "fp16", 4, 2),  # GEMV, one group per tile
    (4, 64, False, True, 16, 64, 128, 4, "bf16", 4, 3),  # decode dot, asym, groups smaller than the tile
    (3, 64, True, True, 64, 64, 64, 1, "fp16", 4, 3),  # prefill, straddling codes, act-order
    (8, 128, False, False, 128, 128, 128, 1, "bf16", 8, 3),  # prefill, bf16
]]
