"""GPTQ error feedback (Frantar et al., 2022), one engine for every method that uses it (gptq, ternary, pbllm,
billm, vq, e8p). The quantizer is a plug-in; the engine owns the Hessian factor and the update order.

With U the upper Cholesky factor of (H + λI)⁻¹ (H = 2XXᵀ/N, λ = damp · mean diag H), columns are quantized in
order, `width` at a time (1 for scalar grids, d for d-dimensional codebooks, a whole block for BiLLM):

    for each step b of `width` columns:
        R_b = W_b − Q(W_b)                          (the plug-in: the rounding error of the columns as updated)
        E_b = R_b U_bb⁻¹                            (1 column: R_b / U_bb)
        W[:, later] −= E_b U[b, later]              (the block OBS update: later columns compensate)

The update is lazy (GPTQ's batching): errors reach the rest of a 128-column block only at the end of each
32-column sub-block, and the columns after the block only at the block's end, each as one matrix product. Rounding
decisions see exactly the same weights as with immediate updates. Grids fixed per group from the weights as
they stand (GPTQ's dynamic groups, ternary's thresholds) are set when a group's first column comes up, after the
pending errors have reached it.

The loop works on Wᵀ ([column, row] layout: each step reads and updates contiguous memory) on one thread.
"""

from __future__ import annotations

from contextlib import contextmanager
import torch

BLOCK = 128  # lazy batch: errors reach the columns after a block once per block
SUB_BLOCK = 32  # nested lazy batch: a column's rank-1 update touches at most the rest of its sub-block


class Quantizer:
    """The plug-in of `error_feedback`: quantizes `width` columns of Wᵀ at a time."""

    width: int = 1

    def starts_group(self, j: int) -> bool:
        """Column j is the first of a group whose grid is fixed from the weights as updated (`start_group`)."""
        return False

    def start_group(self, j: int, rest: torch.Tensor) -> None:
        """rest: the not yet quantized columns j.. ([cols − j, rows]), with every earlier error applied."""

    def residual(self, j: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """Quantize columns j..j+w−1, x = their current weights [w, rows] (w = width, or fewer at the end);
        write the rounding error x − Q(x) into out [w, rows]."""
        raise NotImplementedError


# ---- the Hessian factor ------------------------------------------------------------------------------------------

def lower_triangular_inverse(L: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """L⁻¹ for lower-triangular L by halves: [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]] (about n³/3
    multiply-adds in matrix products, where a triangular solve against I costs n³)."""
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
    """Upper Cholesky factor U of (H + λI)⁻¹ (UᵀU = (H + λI)⁻¹); λ grows tenfold each time the factorisation
    fails. Without forming the inverse: with J the order reversal and J(H + λI)J = L Lᵀ, (H + λI)⁻¹ =
    (J L⁻¹ J)ᵀ (J L⁻¹ J) and J L⁻¹ J is upper triangular, so U = J L⁻¹ J (one Cholesky and one triangular
    inverse; closer to fp64 than inverse-then-Cholesky). `with_damping`: return (U, λ)."""
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


def hessian_factor(H: torch.Tensor | None, cols: int, damp: float = 0.01, act_order: bool = False,
                   dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(dead columns, column order, U in that order, damping λ). Dead inputs (diag H = 0) carry no information:
    their diagonal is set to 1 here and their weights are zeroed by the caller. `act_order`: columns in decreasing
    diag H order. H = None (no calibration data) means H = I. Layers reading the same input share one H object
    (q/k/v, gate/up) and so one factorisation."""
    if H is None:
        return torch.zeros(cols, dtype=torch.bool), torch.arange(cols), torch.eye(cols, dtype=dtype), 0.0
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


def diagonal_block_inverses(U: torch.Tensor, width: int) -> list[torch.Tensor]:
    """U_bb⁻¹ for the diagonal blocks of `width` columns (the last one may be narrower)."""
    n = U.shape[0]
    return [torch.linalg.solve_triangular(U[b:b + width, b:b + width], torch.eye(min(width, n - b), dtype=U.dtype),
                                          upper=True) for b in range(0, n, width)]


@contextmanager
def one_thread():
    """The column loop is thousands of small ops: intra-op threads only add synchronisation, so it runs on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ---- the engine --------------------------------------------------------------------------------------------------

def error_feedback(Wt: torch.Tensor, U: torch.Tensor, quantizer: Quantizer, block_size: int = BLOCK) -> torch.Tensor:
    """GPTQ's lazy-batch loop (module docstring) on Wt = Wᵀ [cols, rows] in quantization order, updated in place
    (each column ends as it stood when quantized). Returns Σ_j e_j² per row: W − Q = E U, so this is
    tr((W − Q)(H + λI)(W − Q)ᵀ) per row, the layer's output error plus λ‖W − Q‖²."""
    cols, rows = Wt.shape
    d = quantizer.width
    block_size = max(d, block_size - block_size % d)
    sub = max(d, SUB_BLOCK - SUB_BLOCK % d)
    inverses = diagonal_block_inverses(U, d) if d > 1 else None
    energy = torch.zeros(rows, dtype=Wt.dtype)
    with one_thread():
        for b0 in range(0, cols, block_size):
            b1 = min(b0 + block_size, cols)
            W1 = Wt[b0:b1].clone()
            Err1 = torch.empty_like(W1)
            U1 = U[b0:b1, b0:b1]
            if d == 1:  # per-column views and 1/U_jj made once per block: the loop's ops are tiny
                xs, errs, err_rows, u_rows = W1.split(1), Err1.split(1), Err1.unbind(0), U1.unbind(0)
                inv_diag = U1.diagonal().reciprocal().tolist()
            for s0 in range(0, b1 - b0, sub):
                s1 = min(s0 + sub, b1 - b0)
                pending = s0  # columns whose errors have not yet reached the columns after s1
                for i in range(s0, s1, d):
                    if quantizer.starts_group(b0 + i):
                        if i > pending:  # the group's columns past s1 first receive the pending errors
                            W1[s1:].addmm_(U1[pending:i, s1:].T, Err1[pending:i], alpha=-1)
                            pending = i
                        quantizer.start_group(b0 + i, torch.cat([W1[i:], Wt[b1:]]))
                    if d == 1:
                        quantizer.residual(b0 + i, xs[i], errs[i])
                        err_rows[i].mul_(inv_diag[i])  # e_j = r_j / U_jj
                        if i + 1 < s1:
                            W1[i + 1:s1].addr_(u_rows[i][i + 1:s1], err_rows[i], alpha=-1.0)
                    else:
                        i1 = min(i + d, s1)
                        quantizer.residual(b0 + i, W1[i:i1], Err1[i:i1])
                        Err1[i:i1] = inverses[(b0 + i) // d].T @ Err1[i:i1]  # E_b = R_b U_bb⁻¹ (transposed)
                        if i1 < s1:
                            W1[i1:s1].addmm_(U1[i:i1, i1:s1].T, Err1[i:i1], alpha=-1)
                W1[s1:].addmm_(U1[pending:s1, s1:].T, Err1[pending:s1], alpha=-1)  # lazy update within the block
            Wt[b1:].addmm_(U[b0:b1, b1:].T, Err1, alpha=-1)  # lazy update of the columns after the block
            Wt[b0:b1] = W1
            energy += Err1.square().sum(0)
    return energy
