"""The learned vector codebook format ("vq", GPTVQ / VPTQ style): each row of a layer is cut into vectors of d
consecutive input features; every vector is one k-bit index into a codebook of 2^k learned d-dimensional centroids.
Rows are grouped into blocks of R consecutive rows (R = `rows_per_codebook`, the last block may be shorter), one
codebook per block.

Per linear layer `p` (N outputs, K inputs, K a multiple of d, nb = ceil(N / R) codebooks):
    p.qweight          int32 [N, ceil((K/d)·k / 32)]  the K/d indices of a row, dense k-bit packed along the row,
                                                        low bits first (llmq.formats.packing's layout; k up to 16)
    p.codebooks        fp16 or int8 [nb, 2^k, d]       the centroids
    p.codebook_scales  fp16 [nb]                       int8 codebooks only: centroid = scale · int8 value
Decoding:  W[n, j·d + t] = C[n // R, code[n, j], t]  (· scale[n // R] for int8 codebooks).
Stored bits per weight: k/d for the indices plus nb · 2^k · d · (16 or 8) (+ 16 · nb for int8 scales) / (N·K) for the
codebooks, plus the padding of each row to whole int32 words; `llmq inspect` counts them all from the file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from .base import Format, register_format
from .packing import pack_bits, packed_words, unpack_bits

VQ_DIMS = (2, 4, 8)
MAX_INDEX_BITS = 16
CODEBOOK_DTYPES = {"fp16": torch.float16, "int8": torch.int8}


def check_shape(in_features: int, dim: int, what: str = "layer") -> None:
    if dim not in VQ_DIMS:
        raise InputError(f"vq: vector dimension must be one of {VQ_DIMS}, got {dim!r}")
    if in_features % dim:
        raise InputError(f"vq: {what} has {in_features} input features, not a multiple of the vector dimension {dim} "
                         f"(choose a dim option dividing it)")


def n_codebooks(out_features: int, rows_per_codebook: int) -> int:
    r = rows_per_codebook or out_features
    return -(-out_features // r)


def codebook_of_rows(out_features: int, rows_per_codebook: int, device=None) -> torch.Tensor:
    r = rows_per_codebook or out_features
    return torch.arange(out_features, dtype=torch.int64, device=device) // r


# ---- dense packing of indices of 1..16 bits ------------------------------------------------------------------------
# Up to 8 bits: llmq.formats.packing. Wider indices use the same little-endian bit stream in int32 words: index j of a
# row occupies bits [j·k, (j+1)·k); an index straddles at most two words.

def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [N, n] (integers in [0, 2^bits)) -> int32 [N, ceil(n·bits/32)]."""
    if bits <= 8:
        return pack_bits(codes, bits)
    if not bits <= MAX_INDEX_BITS:
        raise ValueError(f"index bits must be in 1..{MAX_INDEX_BITS}, got {bits}")
    rows, n = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    words = packed_words(n, bits)
    pos = torch.arange(n, dtype=torch.int64) * bits
    word, shift = pos // 32, pos % 32
    acc = torch.zeros(rows, words + 1, dtype=torch.int64)
    acc.scatter_add_(1, word.expand_as(c), (c << shift) & 0xFFFFFFFF)
    acc.scatter_add_(1, (word + 1).expand_as(c), c >> (32 - shift))  # the part that spills into the next word
    out = acc[:, :words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_codes: int32 [N, w] -> int64 codes [N, n]."""
    if bits <= 8:
        return unpack_bits(packed, bits, n).to(torch.int64)
    p = packed.to(torch.int64) & 0xFFFFFFFF
    p = torch.cat([p, torch.zeros(p.shape[0], 1, dtype=torch.int64, device=p.device)], dim=1)
    pos = torch.arange(n, dtype=torch.int64, device=p.device) * bits
    word, shift = pos // 32, pos % 32
    window = p[:, word] | (p[:, word + 1] << 32)
    return (window >> shift) & ((1 << bits) - 1)


# ---- codebook storage ------------------------------------------------------------------------------------------------

def store_codebooks(C: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 centroids [nb, 2^k, d] -> (stored codebooks, int8 scales or None)."""
    if dtype == "fp16":
        return C.clamp(-65504, 65504).to(torch.float16), None
    amax = C.abs().amax(dim=(1, 2))
    scale = (amax / 127).clamp(2.0**-24, 65504).to(torch.float16)
    q = torch.round(C / scale.float()[:, None, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def load_codebooks(codebooks: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    C = codebooks.to(torch.float32)
    if scales is not None:
        C = C * scales.to(torch.float32)[:, None, None]
    return C


def round_codebooks(C: torch.Tensor, dtype: str) -> torch.Tensor:
    """The centroids as they will decode from the file (fp32)."""
    return load_codebooks(*store_codebooks(C, dtype))


def vq_bits(out: int, inp: int, dim: int, index_bits: int, rows_per_codebook: int, codebook_dtype: str) -> int:
    """Exact stored bits of a layer in this format (what `llmq inspect` counts from the file)."""
    nb = n_codebooks(out, rows_per_codebook)
    entry = 16 if codebook_dtype == "fp16" else 8
    scales = 16 * nb if codebook_dtype == "int8" else 0
    return 32 * out * packed_words(inp // dim, index_bits) + nb * (1 << index_bits) * dim * entry + scales


@dataclass
class VQQuantized:
    codes: torch.Tensor  # int64 [N, K/d] in [0, 2^k)
    codebooks: torch.Tensor  # fp32 [nb, 2^k, d], already representable in the storage dtype
    dim: int
    index_bits: int
    rows_per_codebook: int
    codebook_dtype: str = "fp16"

    def layer_config(self) -> dict:
        out, nv = self.codes.shape
        return {"format": "vq", "bits": self.index_bits / self.dim, "group_size": 0, "sym": True,
                "in_features": nv * self.dim, "out_features": out, "vq_dim": self.dim, "index_bits": self.index_bits,
                "rows_per_codebook": self.rows_per_codebook, "codebook_dtype": self.codebook_dtype}

    def pack(self) -> dict[str, torch.Tensor]:
        cb, scale = store_codebooks(self.codebooks, self.codebook_dtype)
        t = {"qweight": pack_codes(self.codes, self.index_bits), "codebooks": cb.contiguous()}
        if scale is not None:
            t["codebook_scales"] = scale.contiguous()
        return t

    def dequantize(self) -> torch.Tensor:
        return VQFormat.dequantize(self.pack(), self.layer_config())


@register_format
class VQFormat(Format):
    name = "vq"

    @staticmethod
    def tensor_specs(cfg: dict) -> dict:
        out, inp, d, k = cfg["out_features"], cfg["in_features"], cfg["vq_dim"], cfg["index_bits"]
        check_shape(inp, d)
        nb = n_codebooks(out, cfg["rows_per_codebook"])
        dt = cfg.get("codebook_dtype", "fp16")
        if dt not in CODEBOOK_DTYPES:
            raise InputError(f"vq: codebook dtype must be fp16 or int8, got {dt!r}")
        specs = {"qweight": ((out, packed_words(inp // d, k)), torch.int32),
                 "codebooks": ((nb, 1 << k, d), CODEBOOK_DTYPES[dt])}
        if dt == "int8":
            specs["codebook_scales"] = ((nb,), torch.float16)
        return specs

    @staticmethod
    def decode(t: dict, cfg: dict) -> torch.Tensor:
        out, inp, d, k = cfg["out_features"], cfg["in_features"], cfg["vq_dim"], cfg["index_bits"]
        codes = unpack_codes(t["qweight"], k, inp // d)
        C = load_codebooks(t["codebooks"], t.get("codebook_scales"))
        cb = codebook_of_rows(out, cfg["rows_per_codebook"], codes.device)
        flat = (cb[:, None] * (1 << k) + codes).reshape(-1)  # one gather from all codebooks stacked
        return C.reshape(-1, d)[flat].reshape(out, inp)
