"""PB-LLM (Shang et al., 2023): partially binarized LLMs. A fraction of salient weights (Hessian metric) is kept at
8 bits, the rest is binarized with the optimal scale, with GPTQ error feedback (the paper's GPTQ-PB variant).

  salience   s_ij = w_ij² / U_jj²   (U: Cholesky factor of H⁻¹), from the unmodified weights, as the reference does
  selection  per row and 128-column block, the r = round(ratio · width) most salient weights (a fixed count per
             row-block, so the 8-bit weights have a fixed-size sparse layout; the reference takes a per-block
             threshold instead, which varies the count per row)
  8-bit      symmetric per row: value = s · q, q ∈ [−127, 127], s = max |w| / 127
  binary     α per row and group = mean |w| over the group's non-salient weights (the optimal one-basis scale),
             fixed from the unmodified weights; σ = sign(w)
  feedback   column by column, GPTQ (llmq.methods.feedback.error_feedback)
Then, with the signs and 8-bit codes fixed, the α are refit per row by H-weighted least squares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.bitplanes import EMPTY_SLOT
from ..formats.intq import default_group_index, n_groups
from ..formats.pbllm import BLOCK, PbllmQuantized
from .base import Calibration, Method, option, register
from .options import DAMP, FLAG, number
from .feedback import Quantizer, error_feedback, hessian_factor
from .refit import refit_groups

FP16_TINY = 2.0**-24


def _select(metric: torch.Tensor, ratio: float, block: int):
    """Per row and block, the round(ratio·width) largest entries: (bool mask [N, K], uint8 offsets [N, nb, r])."""
    rows, cols = metric.shape
    nb = -(-cols // block)
    r = round(ratio * block)
    mask = torch.zeros_like(metric, dtype=torch.bool)
    idx = torch.full((rows, nb, r), EMPTY_SLOT, dtype=torch.uint8)
    for bi, b0 in enumerate(range(0, cols, block)):
        b1 = min(b0 + block, cols)
        k = min(r, round(ratio * (b1 - b0)))
        if k:
            top = metric[:, b0:b1].topk(k, dim=1).indices
            mask[:, b0:b1].scatter_(1, top, True)
            idx[:, bi, :k] = torch.sort(top, dim=1).values.to(torch.uint8)
    return mask, idx


class PartialBinary(Quantizer):
    """The plug-in for `error_feedback`: a salient weight is rounded to its row's 8-bit grid, any other to
    ±α of its row and group."""

    def __init__(self, mask: torch.Tensor, s8: torch.Tensor, alpha: torch.Tensor, group_index: torch.Tensor):
        self.mask, self.s8, self.alpha = mask.T.contiguous(), s8, alpha.T.contiguous()  # [cols, rows], [rows], [G, rows]
        self.group_of = group_index.tolist()
        self.codes, self.signs = torch.zeros(mask.shape[1], mask.shape[0]), torch.empty(mask.shape[1], mask.shape[0])

    def residual(self, j: int, x: torch.Tensor, out: torch.Tensor) -> None:
        s = torch.where(x >= 0, 1.0, -1.0)
        c = torch.clamp(torch.round(x / self.s8), -127, 127)
        self.signs[j:j + 1], self.codes[j:j + 1] = s, c
        torch.sub(x, torch.where(self.mask[j], c * self.s8, self.alpha[self.group_of[j]] * s), out=out)


def pbllm_quantize(w: torch.Tensor, H: torch.Tensor | None, salient_ratio: float = 0.1, group_size: int = 128,
                   damp: float = 0.01, refit: bool = True, block: int = BLOCK) -> PbllmQuantized:
    rows, cols = w.shape
    w = w.to(torch.float32)
    dead, _, U, _ = hessian_factor(H, cols, damp)
    W = w.clone()
    W[:, dead] = 0
    mask, idx = _select(W.square() / torch.diagonal(U).square()[None, :], salient_ratio, block)
    s8 = (W.abs().amax(1) / 127).clamp_min(FP16_TINY).half().float()
    gi = default_group_index(cols, group_size)
    G = n_groups(cols, group_size)
    nonsal = (~mask).float()
    alpha = torch.zeros(rows, G).index_add_(1, gi, W.abs() * nonsal) / torch.zeros(rows, G).index_add_(1, gi, nonsal).clamp_min(1)
    grid = PartialBinary(mask, s8, alpha.half().float(), gi)
    error_feedback(W.T.contiguous(), U, grid, block)
    codes, signs, alpha = grid.codes.T.contiguous(), grid.signs.T.contiguous(), grid.alpha.T.contiguous()
    fixed = torch.where(mask, codes * s8[:, None], 0.0)
    values = torch.where(mask, 0.0, signs)
    if refit and H is not None:
        alpha = refit_groups(w, H, values, group_size, fixed=fixed, damp=damp)
    col = torch.where(idx != EMPTY_SLOT, idx.long() + (torch.arange(idx.shape[1]) * block)[None, :, None], 0)
    q8 = torch.where(idx != EMPTY_SLOT, codes.gather(1, col.reshape(rows, -1)).reshape(idx.shape), 0)
    return PbllmQuantized(signs=signs, scales=alpha.clamp(-65504, 65504).half(), sparse_idx=idx,
                          sparse_q=q8.to(torch.int8), sparse_scale=s8.half(), group_size=group_size, block=block)


@register
class PBLLM(Method):
    name = "pbllm"
    format = "pbllm"
    bit_widths = "1 + 8-bit salient weights"
    calibration = Calibration.NEEDS
    uses_fields = frozenset({"group_size"})  # binary + 8-bit salient weights: no bits choice

    @dataclass(frozen=True)
    class Options:
        salient_ratio: float = option(0.1, number(0.0, 1.0), "share of weights kept at 8 bits (Hessian salience)")
        damp: float = option(0.01, DAMP, "Hessian damping, fraction of mean diag H")
        refit: bool = option(True, FLAG, "refit the binary scales by H-weighted least squares")

    def quantize(self, weight: torch.Tensor, spec, hessian=None) -> PbllmQuantized:
        o = self.options(spec)
        return pbllm_quantize(weight, hessian, salient_ratio=float(o.salient_ratio), group_size=spec.group_size,
                              damp=float(o.damp), refit=bool(o.refit))
