"""Shared pieces of the lookup-table methods (nf4, any4, higgs): per-group statistics and fp16 scales."""

from __future__ import annotations

import torch

from ..formats.intq import default_group_index, n_groups

FP16_MAX, FP16_TINY = 65504.0, 2.0**-24


def group_reduce(w: torch.Tensor, group_size: int, op: str) -> torch.Tensor:
    """Per row and group of w [N, K] (shorter last group allowed): 'absmax' or 'rms'. [N, G] fp32."""
    k = w.shape[1]
    gi = default_group_index(k, group_size).to(w.device)
    g = n_groups(k, group_size)
    if op == "absmax":
        out = torch.zeros(w.shape[0], g, dtype=torch.float32, device=w.device)
        return out.scatter_reduce_(1, gi.expand_as(w), w.abs().float(), "amax", include_self=True)
    if op == "rms":
        sq = torch.zeros(w.shape[0], g, dtype=torch.float32, device=w.device).index_add_(1, gi, w.float().square())
        cnt = torch.bincount(gi, minlength=g).to(sq)
        return (sq / cnt).sqrt_()
    raise ValueError(op)


def group_sum(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per row and group sums of x [N, K]: [N, G]."""
    k = x.shape[1]
    gi = default_group_index(k, group_size).to(x.device)
    return torch.zeros(x.shape[0], n_groups(k, group_size), dtype=x.dtype, device=x.device).index_add_(1, gi, x)


def fp16_scale(s: torch.Tensor) -> torch.Tensor:
    """Scales rounded to fp16 *before* codes are chosen (so the stored checkpoint reproduces the in-memory
    result); an all-zero group gets scale 1 (its codes then decode to the grid value nearest 0)."""
    s = torch.where(s > 0, s, torch.ones_like(s))
    return s.clamp(FP16_TINY, FP16_MAX).half().float()


def expand(s: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """[N, G] -> [N, K] (each column gets its group's value)."""
    return s[:, default_group_index(in_features, group_size).to(s.device)]


def check_group_size_even(spec, where: str) -> None:
    from ..errors import InputError

    if spec.group_size % 2:
        raise InputError(f"{where}: a 2-d grid needs an even group size (pairs of weights must not straddle groups), got {spec.group_size}")
