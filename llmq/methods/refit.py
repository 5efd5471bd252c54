"""Least-squares refit of per-row scales against the layer's output error (binary and ternary methods).

Once the signs/trits are fixed, a layer's weight is linear in its scales, Q = Σ_g α_g ⊙ V_g (one α per row per
basis). The scales minimising the layer's output error ‖(W − Q)X‖² = tr((W − Q) H (W − Q)ᵀ) solve, per row, the
small system  Σ_h (v_g H v_hᵀ) α_h = v_g H (w − fixed)ᵀ  — the same objective GPTQ minimises greedily.
"""

from __future__ import annotations

import torch


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

