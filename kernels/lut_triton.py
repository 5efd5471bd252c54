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

Rotated layers (HIGGS): the stored input rotation V is applied to x first (llmq.rotation: the fused Triton
Hadamard transform on CUDA), then the kernel computes W̃ (V x).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _lut_kernel(x_ptr, qw_ptr, sc_ptr, tb_ptr, out_ptr, M, N, K, stride_xm, stride_qw, stride_sc, stride_tb, stride_om,
                CB: tl.constexpr, D: tl.constexpr, GS: tl.constexpr, ROW_TABLE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    MASK: tl.constexpr = (1 << CB) - 1
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < K
        m2 = n_mask[:, None] & km[None, :]
        ci = kk // D  # code index of each input column
        bit = ci * CB
        word = bit // 32
        shift = bit % 32
        row = qw_ptr + offs_n[:, None] * stride_qw
        lo = tl.load(row + word[None, :], mask=m2, other=0)
        if 32 % CB == 0:  # no code straddles a word (the arithmetic shift's sign fill is masked off)
            code = (lo >> shift[None, :]) & MASK
        else:
            spill = (shift + CB > 32)[None, :]
            hi = tl.load(row + word[None, :] + 1, mask=m2 & spill, other=0)
            w64 = (lo.to(tl.int64) & 0xFFFFFFFF) | (hi.to(tl.int64) << 32)
            code = ((w64 >> shift[None, :].to(tl.int64)) & MASK).to(tl.int32)
        if ROW_TABLE:
            v = tl.load(tb_ptr + offs_n[:, None] * stride_tb + code, mask=m2, other=0.0)
        else:
            v = tl.load(tb_ptr + code * D + (kk % D)[None, :], mask=m2, other=0.0)
        g = kk // GS if GS > 0 else kk * 0
        s = tl.load(sc_ptr + offs_n[:, None] * stride_sc + g[None, :], mask=m2, other=0.0)
        w = v.to(tl.float32) * s.to(tl.float32)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & km[None, :], other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(w * x.to(tl.float32), axis=1)[None, :]
        elif DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc, mask=m_mask[:, None] & n_mask[None, :])


def lut_matmul_triton(x: torch.Tensor, t: dict[str, torch.Tensor], cfg: dict, bias: torch.Tensor | None = None,
                      block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) @ Wᵀ -> [..., N] in x.dtype for a "lut" layer (input scale and rotation included)."""
    from llmq.formats.lut import input_rotation

    k, n, d = cfg["in_features"], cfg["out_features"], cfg["dim"]
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, layer expects {k}")
    if cfg.get("lut_input_scale"):
        x = x * t["lut_input_scale"].to(x.dtype)  # c ⊙ x (HIGGS column_scale)
    rh = input_rotation(t, cfg)
    if rh is not None:
        x = rh.forward(x)  # V x (the fused Hadamard kernel on CUDA)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    if m:
        bm = 1 if m == 1 else 16
        if interpreting():
            block_n, block_k = 32, 32
        gs = cfg["group_size"] or 0
        qw, sc, tb = t["qweight"], t["scales"], t["table"]
        grid = (triton.cdiv(m, bm), triton.cdiv(n, block_n))
        _lut_kernel[grid](x2, qw, sc, tb, out, m, n, k, x2.stride(0), qw.stride(0), sc.stride(0), tb.stride(0), out.stride(0),
                          CB=cfg["bits"] * d, D=d, GS=0 if gs >= k else gs, ROW_TABLE=cfg["table"] == "row",
                          BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k,
                          DOT_FP32=x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16))
    y = out.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*lead, n)


# (code bits, d, group size, row table, BLOCK_M, activation dtype): GEMV and 16-row dots; straddling 3/6-bit codes
COMPILE_VARIANTS = [(4, 1, 64, False, 1, "fp16"), (4, 1, 128, True, 1, "bf16"), (8, 2, 128, False, 16, "bf16"),
                    (6, 2, 128, False, 16, "fp16"), (3, 1, 64, False, 16, "fp32")]


def compile_variant(cb, d, gs, row, bm, dt, arch: int = 90):
    """Compile the kernel for a GPU architecture without a GPU (Triton ships ptxas): catches what the interpreter
    accepts but the GPU compiler rejects. Must run without TRITON_INTERPRET=1."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"x_ptr": f"*{dt}", "qw_ptr": "*i32", "sc_ptr": "*fp16", "tb_ptr": "*fp16", "out_ptr": "*fp32", "M": "i32", "N": "i32",
           "K": "i32", "stride_xm": "i32", "stride_qw": "i32", "stride_sc": "i32", "stride_tb": "i32", "stride_om": "i32"}
    consts = dict(CB=cb, D=d, GS=gs, ROW_TABLE=row, BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64, DOT_FP32=dt == "fp32")
    sig.update({k: "constexpr" for k in consts})
    names = list(sig)
    src = ASTSource(_lut_kernel, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})


if __name__ == "__main__":
    import sys

    if interpreting():
        sys.exit("unset TRITON_INTERPRET to compile")
    for v in COMPILE_VARIANTS:
        k = compile_variant(*v)
        print(f"ok sm_90 lut {v}: {k.metadata.shared} B shared memory", flush=True)
