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
checkpoints load with the plain group index; dead inputs (diag H = 0) are zeroed. The loop is the shared
engine, llmq.methods.feedback.error_feedback; this file is its integer-grid plug-in (IntGrid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.intq import IntQuantized
from .base import Calibration, Method, option, register
from .options import COMMON_FIELDS, DAMP, FLAG, integer
from .feedback import Quantizer, error_feedback, hessian_factor, one_thread
from .rtn import find_scales


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool, mse_clip: bool = False,
                  act_order: bool = False, damp: float = 0.01, block_size: int = 128, hessian_dtype=torch.float32) -> IntQuantized:
    factor = hessian_factor(H, w.shape[1], damp, act_order, hessian_dtype)  # large dense factorisations: all threads
    with one_thread():
        return _gptq(w, factor, bits, group_size, sym, mse_clip, act_order, block_size, hessian_dtype)


class IntGrid(Quantizer):
    """The plug-in for `error_feedback`: round each column to its group's integer grid. Codes are kept as
    q − zero ∈ [−zero, maxq − zero] (grid value = scale · that, exactly as stored; the zero is added after the loop).
    Grids are kept transposed ([group, row]), as the engine's W."""

    def __init__(self, W, perm, bits, group_size, sym, mse_clip, static, dtype):
        rows, cols = W.shape
        self.g = group_size or cols
        n_groups = -(-cols // self.g)
        self.bits, self.sym, self.mse_clip, self.maxq = bits, sym, mse_clip, (1 << bits) - 1
        self.scales = torch.zeros(n_groups, rows, dtype=dtype)
        self.zeros = torch.zeros(n_groups, rows, dtype=dtype)
        if static:  # every grid fixed up front from the unmodified weights
            s, z = find_scales(W.float(), bits, group_size, sym, mse_clip)
            self.scales.copy_(s.T), self.zeros.copy_(z.T)
        self.group_of = (perm // self.g).tolist()  # group of each (permuted) column, in original numbering
        self.starts = [(not static) and c % self.g == 0 for c in perm.tolist()]
        self.Qt = torch.empty(cols, rows, dtype=dtype)
        self.q_rows = self.Qt.split(1)
        self.scale_rows = self.scales.unbind(0)
        # Per-group rounding bounds: symmetric grids share one constant zero (scalar bounds are the faster clamp).
        half = 1 << (bits - 1)
        self.lows, self.highs = ((-self.zeros, self.maxq - self.zeros) if not sym else
                                 ([-half] * n_groups, [self.maxq - half] * n_groups))

    def starts_group(self, j: int) -> bool:
        return self.starts[j]

    def start_group(self, j: int, rest: torch.Tensor) -> None:  # the group's grid from its weights as updated so far
        gi = self.group_of[j]
        sc, z = find_scales(rest[:self.g].T.float(), self.bits, 0, self.sym, self.mse_clip)
        self.scales[gi], self.zeros[gi] = sc[:, 0], z[:, 0]
        if not self.sym:
            self.lows[gi], self.highs[gi] = -self.zeros[gi], self.maxq - self.zeros[gi]

    def residual(self, j: int, x: torch.Tensor, out: torch.Tensor) -> None:
        g, q = self.group_of[j], self.q_rows[j]
        torch.div(x, self.scale_rows[g], out=q).round_().clamp_(self.lows[g], self.highs[g])
        torch.addcmul(x, q, self.scale_rows[g], value=-1.0, out=out)


def _gptq(w, factor, bits, group_size, sym, mse_clip, act_order, block_size, hessian_dtype) -> IntQuantized:
    dead, perm, Hinv, damping = factor
    W = w.to(hessian_dtype).clone()
    if dead.any():
        W[:, dead] = 0
    # act-order always uses static groups: every grid fixed from the unmodified weights
    grid = IntGrid(W, perm, bits, group_size, sym, mse_clip, static=act_order, dtype=hessian_dtype)
    err_energy = error_feedback(W[:, perm].T.contiguous(), Hinv, grid, block_size)  # Wᵀ in quantization order

    # The layer's output error from the loop's own errors: ‖E‖² = tr((W−Q)(H + λI)(W−Q)ᵀ) (dead columns are zero on
    # both sides); subtracting λ‖W − Q‖² leaves ‖(W−Q)X‖² in H's scale, per row, without another product.
    group_of_t = perm // grid.g
    grid_t = grid.Qt * grid.scales[group_of_t]
    hessian_error = err_energy.sub_((W[:, perm].T - grid_t).square_().sum(0), alpha=damping).clamp_min_(0)
    codes = grid.Qt.add_(grid.zeros[group_of_t]).to(torch.uint8).index_select(0, torch.argsort(perm)).T.contiguous()
    return IntQuantized(
        codes=codes,
        scales=grid.scales.T.to(torch.float16).contiguous(),
        zeros=None if sym else grid.zeros.T.to(torch.uint8).contiguous(),
        bits=bits,
        group_size=group_size,
        hessian_error=hessian_error.float(),
    )


# Static act-order costs nothing at inference (groups stay `column // group_size`) and is much better on
# models with outlier input channels (SmolLM2 w4 g64, 2 WikiText-2 windows: 24.27 with, 29.46 without);
# llm-compressor's GPTQModifier defaults to it too.
ACT_ORDER_DEFAULT = True


@register
class GPTQ(Method):
    name = "gptq"
    format = "int"
    bit_widths = "2-8"
    calibration = Calibration.NEEDS
    uses_fields = frozenset(COMMON_FIELDS)

    @dataclass(frozen=True)
    class Options:
        act_order: bool = option(ACT_ORDER_DEFAULT, FLAG, "columns in decreasing diag H order, groups fixed up front")
        damp: float = option(0.01, DAMP, "Hessian damping, fraction of mean diag H (raised tenfold on failure)")
        block_size: int = option(128, integer(1, 1 << 20), "columns per lazy batch update")
        fp64: bool = option(False, FLAG, "Hessian factor and column loop in float64")

    def quantize(self, weight: torch.Tensor, spec, hessian=None) -> IntQuantized:
        if hessian is None:
            raise ValueError("GPTQ needs the layer's input Hessian (calibration data)")
        o = self.options(spec)
        return gptq_quantize(weight, hessian, spec.bits, spec.group_size, spec.sym, spec.mse_clip,
                             act_order=bool(o.act_order), damp=float(o.damp), block_size=int(o.block_size),
                             hessian_dtype=torch.float64 if o.fp64 else torch.float32)

    def quantize_stacked(self, weights: list[torch.Tensor], spec, hessian=None) -> list[IntQuantized]:
        """Layers sharing one H (q/k/v, gate/up) as one stacked matrix: GPTQ treats rows independently given
        H (grids are per row and group, error feedback runs along each row), so this equals quantizing them
        one by one, with one column loop instead of several."""
        q = self.quantize(torch.cat(weights), spec, hessian)
        return q.split_rows([w.shape[0] for w in weights])
