"""The integer format ("int"): b-bit codes with one fp16 scale (and, if asymmetric, one zero point)
per group of `group_size` consecutive input features.

A group size that does not divide the row gives a shorter last group (as the reference GPTQ code
does); `group_size = 0` means one group per output channel. `g_idx` (optional) maps each input
column to its group, for act-order without static groups; without it, column j belongs to group j // g.
No llmq method writes one: GPTQ's act-order uses static groups, so its codes keep the plain layout.

On disk, per linear layer `p`:
    p.qweight  int32 [out, ceil(in*bits/32)]   codes, dense bit-packed along the input dim
    p.scales   fp16  [out, n_groups]
    p.qzeros   uint8 [out, n_groups]            asymmetric only
    p.g_idx    int32 [in]                       act-order only
Dequantization: w = scale * (code - zero), zero = 2**(bits-1) when symmetric.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Format, register_format
from .packing import pack_bits, packed_words, unpack_bits


def n_groups(in_features: int, group_size: int) -> int:
    g = group_size or in_features
    return -(-in_features // g)


def default_group_index(in_features: int, group_size: int) -> torch.Tensor:
    g = group_size or in_features
    return torch.arange(in_features, dtype=torch.int64) // g


@dataclass
class IntQuantized:
    """A quantized weight in the int format, before packing (codes unpacked, one per weight)."""

    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # fp16 [out, n_groups]
    zeros: torch.Tensor | None  # uint8 [out, n_groups] (asymmetric) or None (symmetric)
    bits: int
    group_size: int
    g_idx: torch.Tensor | None = None  # int32 [in], act-order only
    hessian_error: torch.Tensor | None = None  # fp32 [out]: ‖(W−Q)X‖² per row in H's scale, if the method knows it (GPTQ)

    def layer_config(self) -> dict:
        out, inp = self.codes.shape
        return {
            "format": "int",
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.zeros is None,
            "act_order": self.g_idx is not None,
            "in_features": inp,
            "out_features": out,
        }

    def pack(self) -> dict[str, torch.Tensor]:
        t = {"qweight": pack_bits(self.codes, self.bits), "scales": self.scales.to(torch.float16).contiguous()}
        if self.zeros is not None:
            t["qzeros"] = self.zeros.to(torch.uint8).contiguous()
        if self.g_idx is not None:
            t["g_idx"] = self.g_idx.to(torch.int32).contiguous()
        return t

    def dequantize(self) -> torch.Tensor:
        """What the packed tensors decode to (IntFormat.dequantize), straight from the unpacked codes."""
        inp = self.codes.shape[1]
        gi = self.g_idx.long() if self.g_idx is not None else default_group_index(inp, self.group_size)
        zeros = None if self.zeros is None else self.zeros.to(torch.float32)
        return decode_int(self.codes.to(torch.float32), self.scales, zeros, gi, self.bits)

    def split_rows(self, sizes: list[int]) -> list["IntQuantized"]:
        """The results for consecutive row blocks (layers that were quantized stacked)."""
        parts, r0 = [], 0
        for n in sizes:
            rows = slice(r0, r0 + n)
            parts.append(IntQuantized(self.codes[rows].contiguous(), self.scales[rows].contiguous(),
                                      None if self.zeros is None else self.zeros[rows].contiguous(),
                                      self.bits, self.group_size, self.g_idx,
                                      None if self.hessian_error is None else self.hessian_error[rows]))
            r0 += n
        return parts


@register_format
class IntFormat(Format):
    name = "int"

    @staticmethod
    def tensor_specs(cfg: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out, inp, bits = cfg["out_features"], cfg["in_features"], cfg["bits"]
        g = n_groups(inp, cfg["group_size"])
        specs = {
            "qweight": ((out, packed_words(inp, bits)), torch.int32),
            "scales": ((out, g), torch.float16),
        }
        if not cfg["sym"]:
            specs["qzeros"] = ((out, g), torch.uint8)
        if cfg.get("act_order"):
            specs["g_idx"] = ((inp,), torch.int32)
        return specs

    @staticmethod
    def decode(t: dict[str, torch.Tensor], cfg: dict) -> torch.Tensor:
        """Packed tensors -> fp32 weight [out, in]. Vectorised: one gather, no loop over groups."""
        bits, inp = cfg["bits"], cfg["in_features"]
        codes = unpack_bits(t["qweight"], bits, inp).to(torch.float32)
        gi = t["g_idx"].long() if "g_idx" in t else default_group_index(inp, cfg["group_size"]).to(codes.device)
        return decode_int(codes, t["scales"], t["qzeros"].to(torch.float32) if "qzeros" in t else None, gi, bits)


def decode_int(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, gi: torch.Tensor, bits: int) -> torch.Tensor:
    """(codes − zero) · scale per weight, fp32 [out, in]; codes fp32 (consumed), zeros [out, G] or None (symmetric)."""
    zeros = zeros[:, gi] if zeros is not None else float(1 << (bits - 1))
    return codes.sub_(zeros) * scales.to(torch.float32)[:, gi]  # out of place: the scales may carry gradients
