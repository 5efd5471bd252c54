"""BiLLM (Huang et al., 2024): Hessian-guided binarization with a residual basis for salient columns and a
magnitude split of the rest, block by block with GPTQ-style error compensation — stored really packed
(llmq.formats.billm) within a bit budget (default 1.3 stored bits per weight, everything counted).

For each block of 128 columns, on the weights as updated by the earlier blocks' compensation:
  1. salience of column j:  s_j = Σ_i w_ij² / U_jj²   (U: Cholesky factor of H⁻¹; w²/[H⁻¹]_jj as in OBS)
  2. structured search: for i = 0..i_max, take the top-i columns as salient and binarize the block; keep the i
     with the least Hessian-weighted error Σ ((w − q) / U_jj)²
  3. salient columns: order-2 residual binarization per row, q = α_a σ1 + α_b σ2, σ1 = sign w, σ2 = sign(w − α_a σ1),
     α = mean |·| (the closed-form optimum for one sign basis)
  4. the other columns: split into a concentrated and a sparse group at a magnitude break-point, each binarized with
     its own scale. BiLLM searches a break-point per layer over percentiles and marks every weight with a bitmap —
     a whole extra bit per weight (its "1.08 bits" leave the bitmap and the per-block scales out). Here the break-point
     is per row and block, at the r-th largest magnitude, so the sparse group is a fixed-size list of r in-block
     offsets (8 bits each), with r the largest the budget allows
  5. compensation: E = W_b − Q_b, later columns −= (E U_bb⁻¹) U[b, later]  (exact block OBS update; BiLLM's
     reference divides by diag U_bb only), llmq.methods.feedback.error_feedback with 128-column steps
Storage keeps one scale per row per basis (4 fp16 per row; per-block scales would cost 0.5 bits per weight), so once
all signs are fixed the four scales are refit per row by H-weighted least squares against the original weights.
The per-row means of BiLLM's binarizer are not stored (weights are zero-centred; means would cost more scales).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.billm import BLOCK, BillmQuantized, billm_bits
from ..formats.bitplanes import EMPTY_SLOT
from .base import Calibration, Method, option, register
from .options import DAMP, FLAG, integer, number, optional
from .feedback import Quantizer, error_feedback, hessian_factor, one_thread
from .refit import refit_bases


def plan_budget(out: int, inp: int, max_bpw: float, salient_max: int | None, sparse: int | None, block: int = BLOCK):
    """(salient columns at most per block, sparse slots per row-block) such that even the worst case fits max_bpw."""
    widths = [min(block, inp - b0) for b0 in range(0, inp, block)]
    budget = max_bpw * out * inp

    def worst(sm, r):
        return billm_bits(out, inp, sum(min(sm, w) for w in widths), r, block)

    for sm in ([salient_max] if salient_max is not None else [8, 6, 4, 2, 0]):
        for r in ([sparse] if sparse is not None else range(8, -1, -1)):
            if worst(sm, r) <= budget:
                return sm, r
    # Unreachable (small layers: the four fp16 scales per row alone exceed it): keep the default structure.
    return (salient_max if salient_max is not None else 8), (sparse if sparse is not None else 1)


def _sgn(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0)


def _mean_abs(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean |x| over mask (0 where the mask is empty)."""
    m = mask.to(x.dtype)
    return (x.abs() * m).sum(1) / m.sum(1).clamp_min(1)


def binarize_block(W1: torch.Tensor, salient: torch.Tensor, r: int):
    """One block's binarization for a given salient column set. Returns (Q, σ1, σ2 on salient cols, sparse mask)."""
    rows, width = W1.shape
    sal = torch.zeros(width, dtype=torch.bool)
    sal[salient] = True
    s1 = _sgn(W1)
    Q = torch.empty_like(W1)
    s2 = torch.empty(rows, 0)
    if sal.any():
        ws = W1[:, sal]
        a = ws.abs().mean(1, keepdim=True)
        res = ws - a * s1[:, sal]
        s2 = _sgn(res)
        Q[:, sal] = a * s1[:, sal] + res.abs().mean(1, keepdim=True) * s2
    nonsal = ~sal
    sparse = torch.zeros_like(W1, dtype=torch.bool)
    k = min(r, int(nonsal.sum()))
    if k:
        mags = W1.abs().masked_fill(sal[None, :], -1.0)
        sparse.scatter_(1, mags.topk(k, dim=1).indices, True)
    conc = nonsal[None, :] & ~sparse
    Q = torch.where(conc, _mean_abs(W1, conc)[:, None] * s1, Q)
    if k:
        Q = torch.where(sparse, _mean_abs(W1, sparse)[:, None] * s1, Q)
    return Q, s1, s2, sparse


class BlockBinarizer(Quantizer):
    """The plug-in for `error_feedback`: a whole block at a time (steps 1-4 of the module docstring)."""

    def __init__(self, rows: int, cols: int, U: torch.Tensor, salient_max: int, r: int, block: int):
        self.width, self.sm, self.r = block, salient_max, r
        self.d2 = torch.diagonal(U).square()
        self.signs = torch.empty(rows, cols)
        self.sal_cols, self.sal_signs = [], []
        self.sparse_mask = torch.zeros(rows, cols, dtype=torch.bool)
        self.sparse_idx = torch.full((rows, -(-cols // block), r), EMPTY_SLOT, dtype=torch.uint8)

    def residual(self, b0: int, x: torch.Tensor, out: torch.Tensor) -> None:
        W1 = x.T  # [rows, width], as updated by the earlier blocks' compensation
        b1 = b0 + W1.shape[1]
        db = self.d2[b0:b1]
        order = torch.argsort((W1.square().sum(0) / db), descending=True)
        best = None
        for i in range(min(self.sm, b1 - b0) + 1):
            cand = torch.sort(order[:i]).values
            q = binarize_block(W1, cand, self.r)
            err = float(((W1 - q[0]).square() / db).sum())
            if best is None or err < best[0]:
                best = (err, cand, q)
        _, cand, (Q1, s1, s2, sp) = best
        self.signs[:, b0:b1] = s1
        self.sal_cols.append(cand + b0)
        self.sal_signs.append(s2)
        self.sparse_mask[:, b0:b1] = sp
        if self.r:
            offs = torch.sort(torch.where(sp, torch.arange(b1 - b0), EMPTY_SLOT), dim=1).values[:, :self.r]
            self.sparse_idx[:, b0 // self.width, : offs.shape[1]] = offs.to(torch.uint8)
        torch.sub(x, Q1.T, out=out)


def billm_quantize(w: torch.Tensor, H: torch.Tensor | None, max_bpw: float = 1.3, salient_max: int | None = None,
                   sparse: int | None = None, damp: float = 0.01, refit: bool = True, block: int = BLOCK) -> BillmQuantized:
    with one_thread():  # hundreds of small block ops: threads only add synchronisation
        return _billm(w, H, max_bpw, salient_max, sparse, damp, refit, block)


def _billm(w, H, max_bpw, salient_max, sparse, damp, refit, block) -> BillmQuantized:
    rows, cols = w.shape
    w = w.to(torch.float32)
    sm, r = plan_budget(rows, cols, max_bpw, salient_max, sparse, block)
    dead, _, U, _ = hessian_factor(H, cols, damp)
    W = w.clone()
    W[:, dead] = 0
    bz = BlockBinarizer(rows, cols, U, sm, r, block)
    error_feedback(W.T.contiguous(), U, bz, block)  # step 5: the exact block OBS update
    signs, sal_cols, sal_signs, sparse_mask, sparse_idx = bz.signs, bz.sal_cols, bz.sal_signs, bz.sparse_mask, bz.sparse_idx
    salient = torch.cat(sal_cols)
    s2 = torch.cat(sal_signs, 1) if sal_signs else torch.empty(rows, 0)
    salmask = torch.zeros(cols, dtype=torch.bool)
    salmask[salient] = True
    conc = ~salmask[None, :] & ~sparse_mask
    s2_full = torch.zeros(rows, cols)
    s2_full[:, salient] = s2
    bases = [signs * conc, signs * sparse_mask, signs * salmask[None, :], s2_full]
    if refit and H is not None:
        scales = refit_bases(w, H, bases, damp=damp)
    else:  # per-row mean |.| of each group: the one-basis optimum without data
        salfull = salmask[None, :].expand(rows, cols)
        a = _mean_abs(w, salfull)
        scales = torch.stack([_mean_abs(w, conc), _mean_abs(w, sparse_mask), a, _mean_abs(w - a[:, None] * signs, salfull)], 1)
    return BillmQuantized(signs=signs, salient=salient, signs2=s2, sparse_idx=sparse_idx,
                          scales=scales.clamp(-65504, 65504).to(torch.float16), block=block)


@register
class BiLLM(Method):
    name = "billm"
    format = "billm"
    bit_widths = "1.3 stored (max_bpw budget)"
    calibration = Calibration.NEEDS
    uses_fields: frozenset = frozenset()  # the format fixes the bits and its 128-column blocks; max_bpw is the budget

    @dataclass(frozen=True)
    class Options:
        max_bpw: float = option(1.3, number(1.0, 16.0), "budget in stored bits per weight, everything counted")
        salient_max: int | None = option(None, optional(integer(0, 128)), "salient columns per block at most (null: searched)")
        sparse_per_block: int | None = option(None, optional(integer(0, 64)), "sparse slots per row and block (null: largest in budget)")
        damp: float = option(0.01, DAMP, "Hessian damping, fraction of mean diag H")
        refit: bool = option(True, FLAG, "refit the per-row scales by H-weighted least squares")

    def quantize(self, weight: torch.Tensor, spec, hessian=None) -> BillmQuantized:
        o = self.options(spec)
        return billm_quantize(weight, hessian, max_bpw=float(o.max_bpw), salient_max=o.salient_max,
                              sparse=o.sparse_per_block, damp=float(o.damp), refit=bool(o.refit))
