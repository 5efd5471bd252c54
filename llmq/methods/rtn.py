"""Round-to-nearest onto a uniform integer grid per group, with an optional MSE clipping search.

The grid follows the reference GPTQ code (and compressed-tensors, so exports are exact):
  symmetric:  scale = max|w| / ((2^b - 1) / 2),  zero = 2^(b-1)
  asymmetric: scale = (max w - min w) / (2^b - 1), zero = round(-min w / scale)
Scales are rounded to fp16 *before* the codes are chosen, so the stored checkpoint reproduces the
in-memory result exactly.
"""

from __future__ import annotations

import torch

from ..formats.intq import IntQuantized, default_group_index, n_groups
from .base import Calibration, Method, register
from .options import COMMON_FIELDS

FP16_MAX, FP16_TINY = 65504.0, 2.0**-24


def grid_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool):
    """Per-group (scale, zero) from the group's range; scale already rounded to fp16."""
    maxq = (1 << bits) - 1
    if sym:
        amax = torch.maximum(xmin.abs(), xmax)
        scale = amax / (maxq / 2)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        xmin, xmax = torch.minimum(xmin, torch.zeros_like(xmin)), torch.maximum(xmax, torch.zeros_like(xmax))
        scale = (xmax - xmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
    scale = scale.clamp(FP16_TINY, FP16_MAX).to(torch.float16).to(torch.float32)
    if not sym:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (as float) for w on the grid scale*(q - zero), broadcasting scale/zero against w."""
    return torch.div(w, scale).round_().add_(zero).clamp_(0, (1 << bits) - 1)


def _group_ranges(w: torch.Tensor, group_size: int):
    """Per-group min and max, [out, n_groups]; handles a shorter last group without a Python loop per group."""
    out, inp = w.shape
    g = group_size or inp
    full = inp // g
    mins, maxs = [], []
    if full:
        body = w[:, : full * g].reshape(out, full, g)
        mins.append(body.amin(-1))
        maxs.append(body.amax(-1))
    if inp % g:
        tail = w[:, full * g :]
        mins.append(tail.amin(-1, keepdim=True))
        maxs.append(tail.amax(-1, keepdim=True))
    return torch.cat(mins, 1), torch.cat(maxs, 1)


def _group_sum(x: torch.Tensor, gi: torch.Tensor, ngroups: int) -> torch.Tensor:
    return torch.zeros(x.shape[0], ngroups, dtype=x.dtype).index_add_(1, gi, x)


def find_scales(w: torch.Tensor, bits: int, group_size: int, sym: bool, mse_clip: bool, shrink_steps: int = 80, grid: int = 100):
    """Per-group (scale, zero) [out, n_groups]. With mse_clip, try ranges shrunk by p = 1, 0.99, ..., 0.21
    and keep, per group, the one with the least squared error (the reference GPTQ `find_params(mse=True)`)."""
    xmin, xmax = _group_ranges(w, group_size)
    scale, zero = grid_params(xmin, xmax, bits, sym)
    if not mse_clip:
        return scale, zero
    gi = default_group_index(w.shape[1], group_size)
    ng = n_groups(w.shape[1], group_size)
    best_err = torch.full_like(scale, float("inf"))
    for i in range(shrink_steps):
        p = 1 - i / grid
        s, z = grid_params(p * xmin, p * xmax, bits, sym)
        q = quantize_to_grid(w, s[:, gi], z[:, gi], bits)
        err = _group_sum(((q - z[:, gi]) * s[:, gi] - w).pow(2), gi, ng)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale, zero


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool, mse_clip: bool = False) -> IntQuantized:
    w = w.to(torch.float32)
    scale, zero = find_scales(w, bits, group_size, sym, mse_clip)
    gi = default_group_index(w.shape[1], group_size)
    codes = quantize_to_grid(w, scale[:, gi], zero[:, gi], bits)
    return IntQuantized(
        codes=codes.to(torch.uint8),
        scales=scale.to(torch.float16),
        zeros=None if sym else zero.to(torch.uint8),
        bits=bits,
        group_size=group_size,
    )


@register
class RTN(Method):
    name = "rtn"
    format = "int"
    bit_widths = "2-8"
    calibration = Calibration.IGNORES
    uses_fields = frozenset(COMMON_FIELDS)

    def quantize(self, weight: torch.Tensor, spec, hessian=None) -> IntQuantized:
        return rtn_quantize(weight, spec.bits, spec.group_size, spec.sym, spec.mse_clip)
