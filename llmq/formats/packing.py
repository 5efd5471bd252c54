"""Dense bit packing of unsigned integer codes along the last dimension.

Element j of a row occupies bits [j*b, (j+1)*b) of the row's little-endian bit stream, stored in
int32 words, so a row of n codes takes ceil(n*b/32) words. This is the layout of compressed-tensors'
`pack-quantized` (and what vLLM expects), for any b in 1..8; 3-bit codes straddle word boundaries.
"""

from __future__ import annotations

import sys

import torch

# Codes of 1, 2, 4 or 8 bits never straddle a byte: they are packed byte-wise in uint8 and the bytes read as
# int32 words, which on a little-endian machine is exactly the little-endian bit stream above (8x less memory
# traffic than shifting int64 codes; the int64 path below is the general one).
BYTEWISE = sys.byteorder == "little"


def packed_words(n: int, bits: int) -> int:
    return (n * bits + 31) // 32


CHUNK_ELEMENTS = 1 << 22  # rows are processed in chunks of ~4M codes to bound the int64 temporaries


def _row_chunks(rows: int, n: int):
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes [..., n] (integers in [0, 2**bits)) into int32 words [..., ceil(n*bits/32)]."""
    *lead, n = codes.shape
    flat = codes.reshape(-1, n)
    parts = [_pack_rows(flat[a:b], bits) for a, b in _row_chunks(flat.shape[0], n)] or [_pack_rows(flat, bits)]
    return torch.cat(parts).reshape(*lead, packed_words(n, bits))


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n = codes.shape[1]
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    words = packed_words(n, bits)
    if BYTEWISE and 8 % bits == 0:
        per = 8 // bits
        b = torch.nn.functional.pad(codes.to(torch.uint8), (0, words * 32 // bits - n)).reshape(codes.shape[0], -1, per)
        out = b[..., 0].clone()
        for k in range(1, per):
            out |= b[..., k] << (k * bits)
        return out.view(torch.int32)
    c = codes.to(torch.int64)
    if 32 % bits == 0:  # no code straddles a word: shift each code into place and sum the word's codes
        per = 32 // bits
        c = torch.nn.functional.pad(c, (0, words * per - n)).reshape(c.shape[0], words, per)
        out = (c << (torch.arange(per, dtype=torch.int64) * bits)).sum(-1)
        return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    pos = torch.arange(n, dtype=torch.int64) * bits
    word, shift = pos // 32, pos % 32
    # Accumulate in int64 with one spare word, so a code that straddles two words simply spills over.
    acc = torch.zeros(c.shape[0], words + 1, dtype=torch.int64)
    acc.scatter_add_(1, word.expand_as(c), (c << shift) & 0xFFFFFFFF)
    acc.scatter_add_(1, (word + 1).expand_as(c), c >> (32 - shift))
    out = acc[:, :words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # reinterpret as signed int32


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: int32 words [..., w] -> uint8 codes [..., n]."""
    *lead, w = packed.shape
    flat = packed.reshape(-1, w)
    parts = [_unpack_rows(flat[a:b], bits, n) for a, b in _row_chunks(flat.shape[0], n)] or [_unpack_rows(flat, bits, n)]
    return torch.cat(parts).reshape(*lead, n)


def _unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if BYTEWISE and 8 % bits == 0:
        b = packed.contiguous().view(torch.uint8)
        per, mask = 8 // bits, (1 << bits) - 1
        codes = torch.stack([(b >> (k * bits)) & mask for k in range(per)], -1) if per > 1 else b.unsqueeze(-1)
        return codes.reshape(packed.shape[0], -1)[:, :n].contiguous()
    if 32 % bits == 0:  # one broadcast shift (the arithmetic shift of a negative word is masked off)
        shifts = torch.arange(0, 32, bits, dtype=torch.int32)
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(packed.shape[0], -1)[:, :n].to(torch.uint8)
    p = packed.to(torch.int64) & 0xFFFFFFFF
    p = torch.cat([p, torch.zeros(p.shape[0], 1, dtype=torch.int64)], dim=1)
    pos = torch.arange(n, dtype=torch.int64) * bits
    word, shift = pos // 32, pos % 32
    window = p[:, word] | (p[:, word + 1] << 32)  # 64-bit window holding the whole code
    return ((window >> shift) & ((1 << bits) - 1)).to(torch.uint8)
