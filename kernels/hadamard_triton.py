"""The Triton kernel behind `hadamard.hadamard_triton` (kept apart so importing the reference never needs triton)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def hadamard_kernel(x_ptr, y_ptr, s_ptr, h_ptr, m, stride_x, stride_y, scale,
                    MP: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr, HAS_H: tl.constexpr, HAS_S: tl.constexpr,
                    INVERSE: tl.constexpr):
    row = tl.program_id(0)
    offs_m = tl.arange(0, MP)
    offs_p = tl.arange(0, P)
    idx = offs_m[:, None] * P + offs_p[None, :]  # element (i, j) of the [m, p] view of one vector
    mask = (offs_m < m)[:, None] & (offs_p < P)[None, :]
    v = tl.load(x_ptr + row * stride_x + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_S:
        s = tl.load(s_ptr + idx, mask=mask, other=0.0)
        if not INVERSE:
            v = v * s
    # H_p along the p axis: stage h pairs j and j + h inside blocks of 2h: (a, b) -> (a + b, a - b).
    for st in tl.static_range(LOG_P):
        v = tl.reshape(v, (MP, P // (2 << st), 2, 1 << st))
        v = tl.permute(v, (0, 1, 3, 2))
        a, b = tl.split(v)
        v = tl.join(a + b, a - b)
        v = tl.permute(v, (0, 1, 3, 2))
        v = tl.reshape(v, (MP, P))
    if HAS_H:  # H_m (already transposed for the inverse, zero-padded to MP) along the m axis
        hm = tl.load(h_ptr + offs_m[:, None] * MP + offs_m[None, :])
        v = tl.dot(hm, v, input_precision="ieee")
    v = v * scale
    if HAS_S:
        if INVERSE:
            v = v * s
    tl.store(y_ptr + row * stride_y + idx, v.to(y_ptr.dtype.element_ty), mask=mask)


def _variant(mp, p, has_h, has_s, inverse, dt):
    sig = {"x_ptr": f"*{dt}", "y_ptr": f"*{dt}", "s_ptr": "*fp32", "h_ptr": "*fp32", "m": "i32", "stride_x": "i32",
           "stride_y": "i32", "scale": "fp32"}
    consts = dict(MP=mp, P=p, LOG_P=p.bit_length() - 1, HAS_H=has_h, HAS_S=has_s, INVERSE=inverse)
    return ("hadamard", (mp, p, has_h, has_s, inverse, dt), hadamard_kernel, sig, consts,
            {"num_warps": 4 if mp * p <= 4096 else 8})


# (MP, P, has H_m, signs, inverse, dtype): 576 = 36·16, 1536 = 12·128, 4096, 14336 = 28·512
COMPILE_VARIANTS = [_variant(*v) for v in [(64, 16, True, True, False, "fp16"), (16, 128, True, True, True, "bf16"),
                                           (1, 4096, False, True, False, "fp16"), (32, 512, True, False, False, "bf16")]]
