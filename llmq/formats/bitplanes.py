"""Bit planes and trits: the storage primitives of the binary and ternary formats.

Sign plane: one bit per weight, 1 = +1, 0 = −1, packed with `pack_bits(bits=1)` (element j of a row at bit j % 32
of word j // 32, little-endian, int32 words). Trits: t ∈ {−1, 0, +1} stored as digits d = t + 1, five per byte,
byte = d0 + 3·d1 + 9·d2 + 27·d3 + 81·d4 (≤ 242, since 3⁵ = 243 ≤ 256): 1.6 bits per weight.
"""

from __future__ import annotations

import torch

from .packing import pack_bits, packed_words, unpack_bits

TRITS_PER_BYTE = 5
POW3 = (1, 3, 9, 27, 81)
EMPTY_SLOT = 255  # an unused slot of a fixed-size sparse list (uint8 in-block offsets)


def pack_signs(sign: torch.Tensor) -> torch.Tensor:
    """±1 (or >= 0 / < 0) values [..., n] -> int32 words [..., ceil(n/32)]."""
    if sign.shape[-1] == 0:
        return torch.zeros(*sign.shape[:-1], 0, dtype=torch.int32)
    return pack_bits((sign >= 0).to(torch.uint8), 1)


def unpack_signs(words: torch.Tensor, n: int) -> torch.Tensor:
    """int32 words -> fp32 ±1 [..., n]."""
    if n == 0:
        return torch.zeros(*words.shape[:-1], 0, device=words.device)
    return unpack_bits(words, 1, n).to(torch.float32).mul_(2).sub_(1)


def sign_words(n: int) -> int:
    return packed_words(n, 1)


def trit_bytes(n: int) -> int:
    return -(-n // TRITS_PER_BYTE)


def pack_trits(t: torch.Tensor) -> torch.Tensor:
    """Trits [rows, n] in {−1, 0, 1} -> uint8 [rows, ceil(n/5)]."""
    rows, n = t.shape
    d = (t.to(torch.int64) + 1)
    if d.numel() and (d.min() < 0 or d.max() > 2):
        raise ValueError("trits must be -1, 0 or +1")
    nb = trit_bytes(n)
    d = torch.nn.functional.pad(d, (0, nb * TRITS_PER_BYTE - n), value=1).reshape(rows, nb, TRITS_PER_BYTE)
    return (d * torch.tensor(POW3, dtype=torch.int64)).sum(-1).to(torch.uint8)


def unpack_trits(b: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [rows, ceil(n/5)] -> fp32 trits [rows, n]."""
    v = b.to(torch.int32).unsqueeze(-1)
    d = torch.div(v, torch.tensor(POW3, dtype=torch.int32, device=b.device), rounding_mode="floor") % 3
    return d.reshape(b.shape[0], -1)[:, :n].to(torch.float32).sub_(1)


def sparse_columns(idx: torch.Tensor, block: int, k: int) -> torch.Tensor:
    """uint8 in-block offsets [rows, n_blocks, r] -> absolute columns int64 [rows, n_blocks·r]; empty slots -> k."""
    rows, nb, r = idx.shape
    off = idx.to(torch.int64)
    col = off + (torch.arange(nb, dtype=torch.int64, device=idx.device) * block)[None, :, None]
    return torch.where(off != EMPTY_SLOT, col, k).reshape(rows, nb * r)


def sparse_mask(idx: torch.Tensor, block: int, k: int) -> torch.Tensor:
    """bool [rows, k]: the positions a fixed-size sparse list names."""
    m = torch.zeros(idx.shape[0], k + 1, dtype=torch.bool, device=idx.device)
    m.scatter_(1, sparse_columns(idx, block, k), True)
    return m[:, :k]
