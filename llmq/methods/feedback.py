"""Shared machinery of the binary and ternary methods: GPTQ error feedback for any per-column quantizer, and the
least-squares refit of per-row scales against the layer's output error.

Error feedback (GPTQ, Frantar et al. 2022) with U the upper Cholesky factor of (H + λI)⁻¹ (`gptq._factor`):
    column-wise:  e_j = (w_j − q_j) / U_jj,   W[:, j+1:] −= e_j U[j, j+1:]        (lazy blocks of 128)
    block-wise:   E = W_b − Q_b quantized all at once;  W[:, later] −= (E U_bb⁻¹) U[b, later]
The block form is the exact OBS update for a block whose values were chosen together (BiLLM binarizes a whole
128-column block at once; its reference code divides by diag U_bb only, an approximation).

Scale refit: once the signs/trits are fixed, a layer's weight is linear in its scales, Q = Σ_g α_g ⊙ V_g (one α
per row per basis). The scales minimising the layer's output error ‖(W − Q)X‖² = tr((W − Q) H (W − Q)ᵀ) solve, per
row, the small system  Σ_h (v_g H v_hᵀ) α_h = v_g H (w − fixed)ᵀ  — the same objective GPTQ minimises greedily.
"""

from __future__ import annotations

from typing import Callable

import torch

from .gptq import _factor, one_thread


def cholesky_factor(H: torch.Tensor | None, cols: int, damp: float = 0.01):
    """(dead columns, upper Cholesky factor of the damped inverse Hessian); H = None means H = I (no data)."""
    if H is None:
        return torch.zeros(cols, dtype=torch.bool), torch.eye(cols)
    dead, _perm, U, _damping = _factor(H, False, damp, torch.float32)
    return dead, U


def column_feedback(W: torch.Tensor, U: torch.Tensor, quant_col: Callable, block_size: int = 128,
                    group_start: Callable | None = None) -> torch.Tensor:
    """GPTQ's lazy-batch loop with an arbitrary column quantizer. W [rows, cols] is not modified.

    quant_col(j, w_j) -> q_j (the quantized column, fp32 [rows]); group_start(j, rest) is called before each
    column j with a function returning the still-unquantized columns j.. as [cols_left, rows] (updated so far),
    for quantizers that fix a group's grid from the weights as they stand. Returns Q [rows, cols]."""
    rows, cols = W.shape
    with one_thread():
        Wt = W.T.contiguous()  # [cols, rows]: each column step reads and updates contiguous memory
        Qt = torch.empty_like(Wt)
        for b0 in range(0, cols, block_size):
            b1 = min(b0 + block_size, cols)
            W1 = Wt[b0:b1].clone()
            Err1 = torch.empty_like(W1)
            U1 = U[b0:b1, b0:b1]
            for i in range(b1 - b0):
                j = b0 + i
                if group_start is not None:
                    group_start(j, lambda i=i: torch.cat([W1[i:], Wt[b1:]]))
                q = quant_col(j, W1[i])
                Qt[j] = q
                torch.sub(W1[i], q, out=Err1[i]).div_(U1[i, i])
                W1[i + 1:].addr_(U1[i, i + 1:], Err1[i], alpha=-1)
            Wt[b1:].addmm_(U[b0:b1, b1:].T, Err1, alpha=-1)
    return Qt.T.contiguous()


def block_feedback(W: torch.Tensor, U: torch.Tensor, b0: int, b1: int, Q1: torch.Tensor) -> None:
    """Block-wise OBS update: the block W[:, b0:b1] was quantized to Q1 all at once; push its error onto the
    later columns of W (in place)."""
    if b1 >= W.shape[1]:
        return
    E = W[:, b0:b1] - Q1
    Err = torch.linalg.solve_triangular(U[b0:b1, b0:b1], E, upper=True, left=False)  # E = Err · U_bb
    W[:, b1:].addmm_(Err, U[b0:b1, b1:], alpha=-1)


def _solve_rows(G: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched small SPD solves [N, B, B] x = [N, B]; empty bases (zero diagonal) get α = 0."""
    G, rhs = G.double(), rhs.double()
    empty = torch.diagonal(G, dim1=1, dim2=2) <= 0
    G = G + torch.diag_embed(empty.double())
    rhs = torch.where(empty, 0.0, rhs)
    ridge = 1e-9 * torch.diagonal(G, dim1=1, dim2=2).mean(-1, keepdim=True).clamp_min(1e-30)
    G = G + torch.diag_embed(ridge.expand_as(rhs))
    x, info = torch.linalg.solve_ex(G, rhs.unsqueeze(-1))
    x = x.squeeze(-1)
    if (info != 0).any():
        x[info != 0] = torch.linalg.lstsq(G[info != 0], rhs[info != 0].unsqueeze(-1)).solution.squeeze(-1)
    return x.float()


def damped(H: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    Hd = H.to(torch.float32).clone()
    Hd.diagonal().add_(damp * float(Hd.diagonal().mean()))
    return Hd


def refit_bases(w: torch.Tensor, H: torch.Tensor, bases: list[torch.Tensor], fixed: torch.Tensor | None = None,
                damp: float = 0.01) -> torch.Tensor:
    """Per-row scales [N, len(bases)] minimising ‖(w − fixed − Σ_g α_g ⊙ V_g) X‖² (H-weighted least squares)."""
    Hd = damped(H, damp)
    target = w if fixed is None else w - fixed
    P = [v @ Hd for v in bases]  # one [N, K] x [K, K] product per basis
    B = len(bases)
    G = torch.empty(w.shape[0], B, B)
    for g in range(B):
        for h in range(g, B):
            G[:, g, h] = G[:, h, g] = (P[g] * bases[h]).sum(1)
    rhs = torch.stack([(p * target).sum(1) for p in P], 1)
    return _solve_rows(G, rhs)


def refit_groups(w: torch.Tensor, H: torch.Tensor, values: torch.Tensor, group_size: int,
                 fixed: torch.Tensor | None = None, damp: float = 0.01) -> torch.Tensor:
    """Per-row, per-group scales [N, G] for Q = α[:, k // group_size] · values, H-weighted least squares.
    Bases of different groups have disjoint columns, so all G bases cost one [N, K] x [K, K] product."""
    n, k = values.shape
    g = group_size or k
    ng = -(-k // g)
    Hd = damped(H, damp)
    target = w if fixed is None else w - fixed
    G = torch.empty(n, ng, ng)
    for h in range(ng):  # Y_h = V_h H[C_h, :]: the basis of group h times H, then summed over each group's columns
        c0, c1 = h * g, min(h * g + g, k)
        Y = values[:, c0:c1] @ Hd[c0:c1]
        prod = torch.nn.functional.pad(Y * values, (0, ng * g - k)).reshape(n, ng, g).sum(-1)
        G[:, :, h] = prod
    Pt = target @ Hd
    rhs = torch.nn.functional.pad(Pt * values, (0, ng * g - k)).reshape(n, ng, g).sum(-1)
    return _solve_rows(G, rhs)

