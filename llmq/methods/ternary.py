"""Ternary weights (1.58 bits): w ≈ α · t, t ∈ {−1, 0, +1}, one α per row and group.

Thresholds (per group, from its weights):
  absmean (BitNet b1.58): α = mean |w|, t = clamp(round(w / α), −1, 1)  — i.e. zero below α/2
  mse: threshold Δ searched over Δ = c · mean |w|, c ∈ {0.05, 0.10, ..., 1.5}; α = mean |w| over |w| > Δ (the
       optimal scale for that support); the Δ with the least squared error wins
With a Hessian (calibration data) the trits are chosen column by column with GPTQ error feedback
(llmq.methods.feedback.error_feedback): each group's
(α, Δ) is fixed from the weights as updated when its first column comes up (as GPTQ fixes a group's grid), and once
all trits are fixed the α are refit per row and group by H-weighted least squares. Without data (or
`feedback: false`) it is plain per-group ternarization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.ternary import TernaryQuantized
from .base import Calibration, Method, option, register
from .options import DAMP, FLAG, choice
from .feedback import Quantizer, error_feedback, hessian_factor
from .refit import refit_groups

FP16_TINY = 2.0**-24
MSE_GRID = [0.05 * i for i in range(1, 31)]


def group_params(w: torch.Tensor, threshold: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, Δ) per row of w [rows, g]: the group's scale and zeroing threshold."""
    a = w.abs()
    mean = a.mean(1)
    if threshold == "absmean":
        alpha = mean.clamp_min(FP16_TINY).half().float()
        return alpha, alpha / 2
    best_err = torch.full_like(mean, float("inf"))
    best_a, best_d = mean.clone(), mean / 2
    for c in MSE_GRID:
        d = c * mean
        keep = (a > d[:, None]).float()
        alpha = ((a * keep).sum(1) / keep.sum(1).clamp_min(1)).clamp_min(FP16_TINY).half().float()
        err = (a.square() * (1 - keep)).sum(1) + ((a - alpha[:, None]).square() * keep).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_a, best_d = torch.where(better, alpha, best_a), torch.where(better, d, best_d)
    return best_a, best_d


def ternarize(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return torch.where(w.abs() > delta, torch.sign(w), torch.zeros_like(w))


class TernaryGrid(Quantizer):
    """The plug-in for `error_feedback`: each group's (α, Δ) is fixed from the weights as updated when its first
    column comes up (as GPTQ fixes a group's grid); each column's trits are then sign(w) where |w| > Δ."""

    def __init__(self, rows: int, cols: int, group_size: int, threshold: str):
        self.g, self.threshold = group_size, threshold
        ng = -(-cols // group_size)
        self.alpha, self.delta = torch.empty(ng, rows), torch.empty(ng, rows)
        self.Tt = torch.empty(cols, rows)  # the trits, transposed

    def starts_group(self, j: int) -> bool:
        return j % self.g == 0

    def start_group(self, j: int, rest: torch.Tensor) -> None:
        self.alpha[j // self.g], self.delta[j // self.g] = group_params(rest[:self.g].T, self.threshold)

    def residual(self, j: int, x: torch.Tensor, out: torch.Tensor) -> None:
        gi = j // self.g
        t = self.Tt[j:j + 1]
        t.copy_(ternarize(x, self.delta[gi]))
        torch.addcmul(x, t, self.alpha[gi], value=-1.0, out=out)


def ternary_quantize(w: torch.Tensor, H: torch.Tensor | None = None, group_size: int = 128, threshold: str = "absmean",
                     feedback: bool = True, refit: bool = True, damp: float = 0.01, block: int = 128) -> TernaryQuantized:
    if threshold not in ("absmean", "mse"):
        raise ValueError(f"ternary threshold must be absmean or mse, got {threshold!r}")
    rows, cols = w.shape
    w = w.to(torch.float32)
    g = group_size or cols
    ng = -(-cols // g)
    alpha = torch.empty(rows, ng)
    if H is None or not feedback:
        trits = torch.empty(rows, cols)
        for gi, c0 in enumerate(range(0, cols, g)):
            a, d = group_params(w[:, c0:c0 + g], threshold)
            alpha[:, gi] = a
            trits[:, c0:c0 + g] = ternarize(w[:, c0:c0 + g], d[:, None])
    else:
        dead, _, U, _ = hessian_factor(H, cols, damp)
        W = w.clone()
        W[:, dead] = 0
        grid = TernaryGrid(rows, cols, g, threshold)
        error_feedback(W.T.contiguous(), U, grid, block)
        trits = grid.Tt.T.contiguous()
        alpha = grid.alpha.T.contiguous()
        if refit:
            alpha = refit_groups(w, H, trits, group_size, damp=damp)
    return TernaryQuantized(trits=trits, scales=alpha.clamp(-65504, 65504).half(), group_size=group_size)


@register
class Ternary(Method):
    name = "ternary"
    format = "ternary"
    bit_widths = "1.58"
    calibration = Calibration.USES  # plain ternarization without data; GPTQ feedback with it
    uses_fields = frozenset({"group_size"})  # 1.58 bits, one scale per group

    @dataclass(frozen=True)
    class Options:
        threshold: str = option("absmean", choice("absmean", "mse"), "zeroing threshold: absmean (BitNet) or mse search")
        feedback: bool = option(True, FLAG, "GPTQ error feedback when calibration data is given")
        refit: bool = option(True, FLAG, "refit the scales by H-weighted least squares")
        damp: float = option(0.01, DAMP, "Hessian damping, fraction of mean diag H")

    def quantize(self, weight: torch.Tensor, spec, hessian=None) -> TernaryQuantized:
        o = self.options(spec)
        return ternary_quantize(weight, hessian, group_size=spec.group_size, threshold=str(o.threshold),
                                feedback=bool(o.feedback), refit=bool(o.refit), damp=float(o.damp))
