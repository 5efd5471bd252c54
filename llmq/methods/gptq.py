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

from contextlib import contextmanager

import torch

from ..formats.intq import IntQuantized
from .options import COMMON_FIELDS, DAMP, FLAG, integer
from .rtn import find_scales


def lower_triangular_inverse(L: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """L⁻¹ for lower-triangular L by halves: [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]]. About n³/3
    multiply-adds in matrix products, where a triangular solve against I costs n³ (measured 1.9x faster at n = 1536)."""
    n = L.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(L, torch.eye(n, dtype=L.dtype), upper=False)
    k = (n // 2 + 31) // 32 * 32
    out = torch.zeros_like(L)
    out[:k, :k] = lower_triangular_inverse(L[:k, :k], leaf)
    out[k:, k:] = lower_triangular_inverse(L[k:, k:], leaf)
    torch.mm(out[k:, k:], L[k:, :k] @ out[:k, :k], out=out[k:, :k]).neg_()
    return out


def inverse_hessian_cholesky(H: torch.Tensor, damp: float, max_tries: int = 6, with_damping: bool = False):
    """Upper Cholesky factor U of (H + λI)⁻¹ (U ᵀU = (H + λI)⁻¹); λ grows tenfold each time the factorisation
    fails. Computed without forming the inverse: with J the order reversal and J(H + λI)J = L Lᵀ,
    (H + λI)⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J) and J L⁻¹ J is upper triangular, so U = J L⁻¹ J — one Cholesky and one
    triangular inverse instead of Cholesky, inverse and a second Cholesky (faster, and closer to fp64).
    `with_damping`: return (U, λ), the λ that was added."""
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    flipped = H.flip(0, 1)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(flipped + damp * mean_diag * eye)
        if info == 0:
            U = lower_triangular_inverse(L).flip(0, 1)
            if torch.isfinite(U).all():
                return (U, float(damp * mean_diag)) if with_damping else U
        damp *= 10
    raise RuntimeError(f"Hessian is not positive definite even with damping {damp / 10:g}")


_FACTOR_CACHE: dict = {}

# Lazy updates nest: inside a 128-column block, columns are quantized in sub-blocks of 32 whose errors reach
# the block's later columns as one matrix product; each column's rank-1 update then touches at most 31
# columns instead of up to 127 (the same arithmetic, fewer passes over memory in the per-column loop).
SUB_BLOCK = 32


def _factor(H: torch.Tensor, act_order: bool, damp: float, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(dead columns, column order, upper Cholesky factor of the damped inverse Hessian in that order, damping λ).
    Layers that read the same input share one H object (q/k/v, gate/up): they share this factorisation."""
    key = (id(H), H._version, act_order, damp, dtype)
    if _FACTOR_CACHE.get("key") == key and _FACTOR_CACHE.get("H") is H:
        return _FACTOR_CACHE["value"]
    Hd = H.to(dtype).clone()
    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1
    perm = torch.argsort(torch.diag(Hd), descending=True) if act_order else torch.arange(Hd.shape[0])
    value = (dead, perm, *inverse_hessian_cholesky(Hd[perm[:, None], perm], damp, with_damping=True))
    _FACTOR_CACHE.update(key=key, H=H, value=value)
    return value


@contextmanager
def one_thread():
    """The column loop is thousands of small ops: intra-op threads only add synchronisation (10x slower on a
    busy 2-core machine, measured), so it runs on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool, mse_clip: bool = False,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128, hessian_dtype=torch.float32) -> IntQuantized:
    factor = _factor(H, act_order, damp, hessian_dtype)  # large dense factorisations: all threads
    with one_thread():
        return _gptq(w, factor, bits, group_size, sym, mse_clip, act_order, block_size, hessian_dtype)


def round_columns(W1: torch.Tensor, rows: tuple, scales, lows, highs, group_of: list[int], i0: int, i1: int, s1: int) -> None:
    """The per-column step for columns i0..i1−1 of a block W1 ([column, row] layout): round to the group's grid,
    error e = (w − grid value) / Hinv[i, i], pushed onto the block's columns up to s1. `rows`: per-column views
    of W1, of the rounded values, of the errors and of the block's Hinv rows, and 1/diag(Hinv), made once per block."""
    w_rows, q_rows, err_rows, h_rows, inv_diag = rows
    for i in range(i0, i1):
        g, w, q, e = group_of[i], w_rows[i], q_rows[i], err_rows[i]
        torch.div(w, scales[g], out=q).round_().clamp_(lows[g], highs[g])
        torch.addcmul(w, q, scales[g], value=-1.0, out=e).mul_(inv_diag[i])
        if i + 1 < s1:
            W1[i + 1 : s1].addr_(h_rows[i][i + 1 : s1], e, alpha=-1.0)


def _gptq(w, factor, bits, group_size, sym, mse_clip, act_order, block_size, hessian_dtype) -> IntQuantized:
    rows, cols = w.shape
    g = group_size or cols
    n_groups = -(-cols // g)
    maxq = (1 << bits) - 1
    dead, perm, Hinv, damping = factor
    W = w.to(hessian_dtype).clone()
    if dead.any():
        W[:, dead] = 0

    # Grids are kept transposed ([group, row]) and so is W ([column, row]): each step of the column loop
    # then reads and updates contiguous rows of memory.
    scales = torch.zeros(n_groups, rows, dtype=hessian_dtype)
    zeros = torch.zeros(n_groups, rows, dtype=hessian_dtype)
    static = act_order  # act-order always uses static groups: every grid fixed from the unmodified weights
    if static:
        s, z = find_scales(W.float(), bits, group_size, sym, mse_clip)
        scales.copy_(s.T), zeros.copy_(z.T)

    Wt = W[:, perm].T.contiguous()  # [cols, rows] in quantization order
    group_of_t = perm // g  # group of each (permuted) column, in original numbering
    group_of = group_of_t.tolist()
    starts_group = [(not static) and int(c) % g == 0 for c in perm.tolist()]
    # The loop rounds to q − zero ∈ [−zero, maxq − zero] (grid value = scale · that, exactly as stored); the codes
    # are q − zero + zero, added once after the loop.
    Qt = torch.empty(cols, rows, dtype=hessian_dtype)
    err_energy = torch.zeros(rows, dtype=hessian_dtype)
    # Per-group rounding bounds: symmetric grids share one constant zero (scalar bounds are the faster clamp).
    lows, highs = (-zeros, maxq - zeros) if not sym else ([-(1 << (bits - 1))] * n_groups, [maxq - (1 << (bits - 1))] * n_groups)
    scale_rows = scales.unbind(0)

    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        W1 = Wt[b0:b1].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[b0:b1, b0:b1]
        block_groups = group_of[b0:b1]
        views = (W1.unbind(0), Qt[b0:b1].unbind(0), Err1.unbind(0), Hinv1.unbind(0), Hinv1.diagonal().reciprocal().tolist())
        for s0 in range(0, b1 - b0, SUB_BLOCK):
            s1 = min(s0 + SUB_BLOCK, b1 - b0)
            pending = s0  # columns whose errors have not yet reached the block's columns after s1
            i = s0
            while i < s1:
                if starts_group[b0 + i]:  # first column of a group: fix its grid from the weights as updated so far
                    if i > pending:  # (the group's columns past s1 must first receive the pending errors)
                        W1[s1:].addmm_(Hinv1[pending:i, s1:].T, Err1[pending:i], alpha=-1)
                        pending = i
                    gi = group_of[b0 + i]
                    sc, z = find_scales(torch.cat([W1[i:], Wt[b1:]])[:g].T.float(), bits, 0, sym, mse_clip)
                    scales[gi], zeros[gi] = sc[:, 0], z[:, 0]
                    if not sym:
                        lows[gi], highs[gi] = -zeros[gi], maxq - zeros[gi]
                j = next((k for k in range(i + 1, s1) if starts_group[b0 + k]), s1)
                round_columns(W1, views, scale_rows, lows, highs, block_groups, i, j, s1)
                i = j
            W1[s1:].addmm_(Hinv1[pending:s1, s1:].T, Err1[pending:s1], alpha=-1)  # lazy update of the block's later columns
        Wt[b1:].addmm_(Hinv[b0:b1, b1:].T, Err1, alpha=-1)  # lazy batch update of all later columns
        err_energy += Err1.square().sum(0)

    # The layer's output error from the loop's own errors: W − Q = E U, so ‖E‖² = tr((W−Q)(H + λI)(W−Q)ᵀ)
    # (dead columns are zero on both sides); subtracting λ‖W − Q‖² leaves ‖(W−Q)X‖² in H's scale, per row,
    # without another [rows, cols] x [cols, cols] product for the report.
    grid_t = Qt * scales[group_of_t]
    hessian_error = err_energy.sub_((W[:, perm].T - grid_t).square_().sum(0), alpha=damping).clamp_min_(0)
    codes = Qt.add_(zeros[group_of_t]).to(torch.uint8).index_select(0, torch.argsort(perm)).T.contiguous()
    return IntQuantized(
        codes=codes,
        scales=scales.T.to(torch.float16).contiguous(),
        zeros=None if sym else zeros.T.to(torch.uint8).contiguous(),
        bits=bits,
        group_size=group_size,
        hessian_error=hessian_error.float(),
    )


# Static act-order costs nothing at inference (groups stay `column // group_size`) and is much better on
# models with outlier input channels (SmolLM2 w4 g64, 2 WikiText-2 windows: 24.27 with, 29.46 without);
# llm-compressor's GPTQModifier defaults to it too.
ACT_ORDER_DEFAULT = True


class GPTQ:
    name = "gptq"
    needs_hessian = True
    uses_fields = frozenset(COMMON_FIELDS)
    options_schema = {"act_order": FLAG, "damp": DAMP, "block_size": integer(1, 1 << 20), "fp64": FLAG}

    def quantize(self, weight: torch.Tensor, spec, hessian=None) -> IntQuantized:
        if hessian is None:
            raise ValueError("GPTQ needs the layer's input Hessian (calibration data)")
        o = spec.options
        return gptq_quantize(weight, hessian, spec.bits, spec.group_size, spec.sym, spec.mse_clip,
                             act_order=bool(o.get("act_order", ACT_ORDER_DEFAULT)), damp=float(o.get("damp", 0.01)),
                             block_size=int(o.get("block_size", 128)),
                             hessian_dtype=torch.float64 if o.get("fp64") else torch.float32)

    def quantize_stacked(self, weights: list[torch.Tensor], spec, hessian=None) -> list[IntQuantized]:
        """Layers sharing one H (q/k/v, gate/up) as one stacked matrix: GPTQ treats rows independently given
        H (grids are per row and group, error feedback runs along each row), so this equals quantizing them
        one by one, with one column loop instead of several."""
        q = self.quantize(torch.cat(weights), spec, hessian)
        return q.split_rows([w.shape[0] for w in weights])
