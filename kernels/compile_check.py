"""Compile the int and Hadamard kernels for a GPU architecture without a GPU (Triton ships ptxas): catches what the
interpreter accepts but the GPU compiler rejects (tl.dot shapes, non-constexpr globals, type errors).

    python -m llmq.kernels.compile_check [--arch 90]

Must run without TRITON_INTERPRET=1 (the interpreter replaces kernels by Python functions).
"""

from __future__ import annotations

import argparse
import os
import sys

# (bits, group size, act-order, zero points, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, activation dtype, warps, stages)
VARIANTS = [
    (4, 128, False, False, 1, 64, 256, 8, "fp16", 4, 2),  # GEMV, one group per tile
    (4, 64, False, True, 16, 64, 128, 4, "bf16", 4, 3),  # decode dot, asym, groups smaller than the tile
    (3, 64, True, True, 64, 64, 64, 1, "fp16", 4, 3),  # prefill, straddling codes, act-order
    (8, 128, False, False, 128, 128, 128, 1, "bf16", 8, 3),  # prefill, bf16
]


def compile_variant(bits, gs, act, zero, bm, bn, bk, sk, dt, warps, stages, arch: int = 90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .intq_triton import _int_matmul_kernel

    atomic = sk > 1 or bm <= 16
    sig = {"x_ptr": f"*{dt}", "qw_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8" if zero else "*i32", "g_ptr": "*i32",
           "out_ptr": "*fp32" if atomic else f"*{dt}", "M": "i32", "N": "i32", "K": "i32", "W": "i32", "stride_xm": "i32",
           "stride_qn": "i32", "stride_s": "i32", "stride_z": "i32", "stride_om": "i32", "M_BUCKET": "i32"}
    consts = dict(BITS=bits, GS=gs, ACT_ORDER=act, HAS_ZERO=zero, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk,
                  GROUP_M=1 if bm <= 16 else 8, DOT_FP32=False, GROUP_CONST=(not act) and (gs == 0 or gs % bk == 0))
    sig.update({k: "constexpr" for k in consts})
    names = list(sig)
    src = ASTSource(_int_matmul_kernel, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


HADAMARD_VARIANTS = [  # (MP, P, has H_m, signs, inverse, dtype): 576 = 36·16, 1536 = 12·128, 4096, 14336 = 28·512
    (64, 16, True, True, False, "fp16"), (16, 128, True, True, True, "bf16"), (1, 4096, False, True, False, "fp16"),
    (32, 512, True, False, False, "bf16"),
]


def compile_hadamard(mp, p, has_h, has_s, inverse, dt, arch: int = 90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .hadamard_triton import hadamard_kernel

    sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "s_ptr": "*fp32", "h_ptr": "*fp32", "m": "i32", "stride_x": "i32",
           "stride_y": "i32", "scale": "fp32"}
    consts = dict(MP=mp, P=p, LOG_P=p.bit_length() - 1, HAS_H=has_h, HAS_S=has_s, INVERSE=inverse)
    sig.update({k: "constexpr" for k in consts})
    names = list(sig)
    src = ASTSource(hadamard_kernel, sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4 if mp * p <= 4096 else 8})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET to compile")
    for v in VARIANTS:
        k = compile_variant(*v, arch=args.arch)
        print(f"ok sm_{args.arch} {v}: {k.metadata.shared} B shared memory", flush=True)
    for v in HADAMARD_VARIANTS:
        k = compile_hadamard(*v, arch=args.arch)
        print(f"ok sm_{args.arch} hadamard {v}: {k.metadata.shared} B shared memory", flush=True)


if __name__ == "__main__":
    main()
