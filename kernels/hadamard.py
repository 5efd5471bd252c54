"""Fused online Hadamard transform for rotated layers: signs, fast Walsh–Hadamard, small dense factor, scale, in
one pass over the activations.

    forward:  y = T (s ⊙ x)          inverse:  x = s ⊙ (Tᵀ y)          T = (H_m ⊗ H_p) / √n,  n = m·p

on the last dim, with p a power of two (H_p Sylvester, applied as log2(p) butterfly stages) and H_m a small ±1
matrix (Paley constructions for the sizes models use, e.g. 576 = 36·16, 1536 = 12·128; `hm=None` for m = 1).
This is the transform `llmq.rotation` applies around a rotated layer's matmul (the caller passes its H_m).

The Triton kernel keeps one vector as an [m, p] tile in registers: butterflies along p via reshape/split/join,
then H_m as one fp32 `tl.dot` (m padded to ≥ 16, the GPU's smallest dot), scale and signs fused, one read and
one write of the activations. The torch reference below is the CPU path and the tests' yardstick.
"""

from __future__ import annotations

import math

import torch


def _check(n: int, hm: torch.Tensor | None) -> tuple[int, int]:
    m = 1 if hm is None else hm.shape[0]
    p = n // m
    if hm is not None and hm.shape != (m, m):
        raise ValueError(f"H_m must be square, got {tuple(hm.shape)}")
    if n % m or p & (p - 1):
        raise ValueError(f"size {n} is not m·2^k for m = {m}")
    return m, p


def fwht_ref(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform (Sylvester order) on the last dim: log2(p) vectorised stages."""
    p = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < p:
        y = x.reshape(*lead, p // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2).reshape(*lead, p)
        h *= 2
    return x


def hadamard_ref(x: torch.Tensor, hm: torch.Tensor | None = None, signs: torch.Tensor | None = None,
                 inverse: bool = False) -> torch.Tensor:
    n = x.shape[-1]
    m, p = _check(n, hm)
    v = x.to(torch.promote_types(x.dtype, torch.float32))
    if signs is not None and not inverse:
        v = v * signs.to(v)
    v = fwht_ref(v.reshape(*x.shape[:-1], m, p))
    if hm is not None:
        h = hm.to(v)
        v = torch.matmul(h.T if inverse else h, v)
    v = v.reshape(x.shape) * (1.0 / math.sqrt(n))
    if signs is not None and inverse:
        v = v * signs.to(v)
    return v.to(x.dtype)


_PADDED: dict = {}


def _padded(hm: torch.Tensor, mp: int, inverse: bool) -> torch.Tensor:
    key = (hm.data_ptr(), hm.device, mp, inverse)
    if key not in _PADDED:
        h = torch.zeros(mp, mp, dtype=torch.float32, device=hm.device)
        h[: hm.shape[0], : hm.shape[0]] = (hm.T if inverse else hm).to(torch.float32)
        _PADDED[key] = h
    return _PADDED[key]


def hadamard_triton(x: torch.Tensor, hm: torch.Tensor | None = None, signs: torch.Tensor | None = None,
                    inverse: bool = False) -> torch.Tensor:
    import triton

    from .hadamard_triton import hadamard_kernel

    n = x.shape[-1]
    m, p = _check(n, hm)
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return y.reshape(x.shape)
    mp = 1 if hm is None else max(16, triton.next_power_of_2(m))
    h = _padded(hm, mp, inverse) if hm is not None else x2  # x2: placeholder pointer, never read
    s = signs.to(device=x.device, dtype=torch.float32).contiguous() if signs is not None else x2
    hadamard_kernel[(x2.shape[0],)](
        x2, y, s, h, m, x2.stride(0), y.stride(0), 1.0 / math.sqrt(n),
        MP=mp, P=p, LOG_P=p.bit_length() - 1, HAS_H=hm is not None, HAS_S=signs is not None, INVERSE=inverse,
        num_warps=4 if n <= 4096 else 8,
    )
    return y.reshape(x.shape)
