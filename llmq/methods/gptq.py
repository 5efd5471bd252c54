"""GPTQ (Frantar et al., 2022): quantize a layer column by column, pushing each column's rounding error
onto the columns not yet quantized through the inverse Hessian of the layer's inputs, H = 2XXᵀ/N.

    Hinv = upper Cholesky factor of (H + λI)⁻¹          (λ = damp · mean diag H; retried larger on failure)
    for each block of 128 columns (lazy batch updates):
        for each column j in the block:
            q_j   = grid(w_j)                           (the group's grid: RTN's, optionally MSE-clipped)
            e_j   = (w_j − q_j) / Hinv[j, j]
            W[:, j+1:block end] −= e_j · Hinv[j, j+1:block end]
        W[:, block end:] −= E_block · Hinv[block, block end:]

Options: act-order (columns in decreasing diag(H) order) with static groups — every group's grid is fixed
from the unmodified weights up front, so group membership stays `column // group_size` and act-order
checkpoints load with the plain group index; dead inputs (diag H = 0) are zeroed. The per-column loop is
the algorithm; each step is one vectorised operation over all rows.
"""

from __future__ import annotations

import torch

from ..formats.intq import IntQuantized
from .rtn import find_scales


def inverse_hessian_cholesky(H: torch.Tensor, damp: float, max_tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹; λ grows tenfold each time the factorisation fails."""
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
        damp *= 10
    raise RuntimeError(f"Hessian is not positive definite even with damping {damp / 10:g}")


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool, mse_clip: bool = False,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128, hessian_dtype=torch.float32) -> IntQuantized:
    W = w.to(hessian_dtype).clone()
    H = H.to(hessian_dtype).clone()
    rows, cols = W.shape
    g = group_size or cols
    n_groups = -(-cols // g)
    maxq = (1 << bits) - 1

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scales = torch.zeros(rows, n_groups, dtype=hessian_dtype)
    zeros = torch.zeros(rows, n_groups, dtype=hessian_dtype)
    static = act_order  # act-order always uses static groups
    if static:
        for gi in range(n_groups):
            s, z = find_scales(W[:, gi * g : (gi + 1) * g].float(), bits, 0, sym, mse_clip)
            scales[:, gi], zeros[:, gi] = s[:, 0], z[:, 0]

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // g  # group of each (permuted) column, in original numbering
    Hinv = inverse_hessian_cholesky(H, damp)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)

    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        W1 = W[:, b0:b1].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            gi = int(group_of[col])
            if not static and int(perm[col]) % g == 0:  # first column of a group: fix its grid now
                s, z = find_scales(torch.cat([W1[:, i:], W[:, b1:]], 1)[:, :g].float(), bits, 0, sym, mse_clip)
                scales[:, gi], zeros[:, gi] = s[:, 0], z[:, 0]
            s, z = scales[:, gi], zeros[:, gi]
            wcol = W1[:, i]
            q = torch.clamp(torch.round(wcol / s) + z, 0, maxq)
            codes[:, col] = q.to(torch.uint8)
            err = (wcol - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, b1:] -= Err1 @ Hinv[b0:b1, b1:]

    codes = codes[:, torch.argsort(perm)]
    return IntQuantized(
        codes=codes,
        scales=scales.to(torch.float16),
        zeros=None if sym else zeros.to(torch.uint8),
        bits=bits,
        group_size=group_size,
    )


class GPTQ:
    name = "gptq"
    needs_hessian = True

    def quantize(self, weight: torch.Tensor, spec, hessian=None) -> IntQuantized:
        if hessian is None:
            raise ValueError("GPTQ needs the layer's input Hessian (calibration data)")
        o = spec.options
        return gptq_quantize(weight, hessian, spec.bits, spec.group_size, spec.sym, spec.mse_clip,
                             act_order=bool(o.get("act_order", False)), damp=float(o.get("damp", 0.01)),
                             block_size=int(o.get("block_size", 128)),
                             hessian_dtype=torch.float64 if o.get("fp64") else torch.float32)
