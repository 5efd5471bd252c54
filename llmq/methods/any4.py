"""any4 (Elhoushi & Johnson 2025): a learned 4-bit lookup table per output row.

Each row n gets its own 16 fp16 values t_n; weights are first scaled per group (absmax, fp16, as NF4 does:
u = w / s; `--group-size 0` = one scale per row), then the row's table is fitted to the row's scaled weights
by weighted 1-d k-means (Lloyd), minimising the layer's output error proxy

    Σ_k h_k (w_nk − s_n,g(k) · t_n[c_nk])²  =  Σ_k ω_nk (u_nk − t_n[c_nk])²,   ω_nk = h_k · s²_n,g(k)

with h_k = diag(H)_k / 2 = mean x_k² over the calibration tokens (the activation statistics: a channel that
carries large inputs matters more); with `--calib none` h = 1. Lloyd alternates nearest-value assignment
(thresholds at midpoints of the sorted table) and weighted means per value; it starts from the NF4 table, so
the result is never worse than NF4 with the same scales on this objective (each Lloyd step can only lower it).
The table is rounded to fp16 and the codes re-chosen against the rounded values. Stored: format "lut" with a
per-row table [N, 16] fp16, counted in the bits per weight (256 bits per row: 0.44 bits/weight at K = 576).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.lut import LutQuantized
from .grids import nf4_table
from .lut_common import expand, fp16_scale, group_reduce
from .base import Calibration, Method, option, register
from .options import FLAG, integer


def nearest_rows(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per row, the index of the nearest value of that row's sorted table [N, T] for every u [N, K]."""
    mid = ((table[:, 1:] + table[:, :-1]) / 2).contiguous()
    return torch.searchsorted(mid, u.contiguous())


def weighted_lloyd_rows(u: torch.Tensor, omega: torch.Tensor, table: torch.Tensor, iters: int = 50,
                        tol: float = 1e-7) -> torch.Tensor:
    """Weighted 1-d k-means of every row of u [N, K] (weights ω [N, K]) from the initial tables [N, T]."""
    table = table.clone()
    for _ in range(iters):
        c = nearest_rows(u, table)
        num = torch.zeros_like(table).scatter_add_(1, c, omega * u)
        den = torch.zeros_like(table).scatter_add_(1, c, omega)
        new = torch.where(den > 0, num / den.clamp_min(1e-30), table).sort(1).values  # an empty cell keeps its value
        moved = float((new - table).abs().max())
        table = new
        if moved < tol:
            break
    return table


def weighted_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor | None) -> float:
    """Σ h_k (w − q)² (h = 1 without statistics)."""
    d = (w - q).square()
    return float(d.sum() if h is None else (d * h[None, :]).sum())


def any4_quantize(w: torch.Tensor, H: torch.Tensor | None = None, group_size: int = 128, iters: int = 50,
                  weighted: bool = True) -> LutQuantized:
    w = w.to(torch.float32)
    n, k = w.shape
    scale = fp16_scale(group_reduce(w, group_size, "absmax"))
    se = expand(scale, k, group_size)
    u = w / se
    h = torch.diagonal(H).float() / 2 if (H is not None and weighted) else torch.ones(k)
    h = h.clamp_min(0)
    omega = h[None, :] * se.square()
    if float(omega.sum()) <= 0:  # no signal at all (dead inputs): fall back to unweighted
        omega = se.square()
    init = nf4_table().float()[None, :].expand(n, -1)
    table = weighted_lloyd_rows(u, omega, init, iters=iters).half().float().sort(1).values
    codes = nearest_rows(u, table)
    return LutQuantized(codes=codes.to(torch.uint8), scales=scale.half(), table=table.half(), bits=4, dim=1,
                        group_size=group_size, in_features=k, grid="any4", table_kind="row")


@register
class Any4(Method):
    name = "any4"
    format = "lut"
    bit_widths = "4"
    calibration = Calibration.USES  # weighted by activation statistics when calibration is given; unweighted without
    uses_fields = frozenset({"group_size"})  # always 4-bit (16 values per row)

    @dataclass(frozen=True)
    class Options:
        iters: int = option(50, integer(1, 1000), "Lloyd iterations of each row's table")
        weighted: bool = option(True, FLAG, "weight by the input channels' mean x² (calibration data)")

    def quantize(self, weight: torch.Tensor, spec, hessian=None) -> LutQuantized:
        o = self.options(spec)
        return any4_quantize(weight, hessian, spec.group_size, iters=int(o.iters), weighted=bool(o.weighted))
