"""The E8P format ("e8p"): 8-dimensional vectors of consecutive input weights coded with the E8P lattice codebook
(llmq/codebooks/e8p.py), 2, 3 or 4 bits per weight with residual stages:

    bits 2:  W[n, 8j:8j+8] = s₁ · E8P(codes[n, j])
    bits 3:  ... + s₂ · E8₁(codes2[n, j])          (256-point 1-bit E8 codebook, 8-bit codes)
    bits 4:  ... + s₂ · E8P(codes2[n, j])

Per linear layer `p` (N outputs, K inputs, K a multiple of 8):
    p.codes    int16 [N, K/8]   stage-1 E8P codes (16 bits, read as unsigned)
    p.codes2   int16 [N, K/8]   stage-2 E8P codes (4 bits)   |   uint8 [N, K/8] stage-2 E8 codes (3 bits)
    p.scales   fp32  [stages]   one scale per stage for the whole layer
The codebooks themselves are defined by llmq (a 256-entry base table each) and are not stored. Stored bits per weight:
16/8 per E8P stage + 8/8 for the E8 stage + 32·stages/(N·K) for the scales (plus a rotation's sign vectors, which
`llmq inspect` counts with the layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codebooks.e8p import DIM, STAGES, e8_decode, e8p_decode
from ..errors import InputError
from .base import Format, register_format


def check_shape(out_features: int, in_features: int) -> None:
    if in_features % DIM:
        raise InputError(f"the e8p format codes 8 consecutive input weights together: in_features {in_features} is not a multiple of 8")


def code_specs(bits: int, out: int, inp: int) -> dict:
    if bits not in STAGES:
        raise ValueError(f"e8p layers have 2, 3 or 4 bits per weight, not {bits!r}")
    specs = {"codes": ((out, inp // DIM), torch.int16)}
    if bits == 4:
        specs["codes2"] = ((out, inp // DIM), torch.int16)
    elif bits == 3:
        specs["codes2"] = ((out, inp // DIM), torch.uint8)
    specs["scales"] = ((len(STAGES[bits]),), torch.float32)
    return specs


def _as_storage(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    c = codes.to(torch.int64)
    if dtype == torch.int16:  # 16-bit unsigned codes stored in int16's two's complement
        c = torch.where(c >= 1 << 15, c - (1 << 16), c)
    return c.to(dtype).contiguous()


@dataclass
class E8PQuantized:
    codes: list[torch.Tensor]  # per stage, int64 [N, K/8]
    scales: torch.Tensor  # fp32 [stages]
    bits: int

    def layer_config(self) -> dict:
        out, nv = self.codes[0].shape
        return {"format": "e8p", "bits": self.bits, "group_size": 0, "sym": True, "in_features": nv * DIM,
                "out_features": out, "codebooks": list(STAGES[self.bits])}

    def pack(self) -> dict[str, torch.Tensor]:
        cfg = self.layer_config()
        specs = code_specs(self.bits, cfg["out_features"], cfg["in_features"])
        t = {"codes": _as_storage(self.codes[0], specs["codes"][1])}
        if len(self.codes) > 1:
            t["codes2"] = _as_storage(self.codes[1], specs["codes2"][1])
        t["scales"] = self.scales.to(torch.float32).contiguous()
        return t

    def dequantize(self) -> torch.Tensor:
        return E8PFormat.dequantize(self.pack(), self.layer_config())


@register_format
class E8PFormat(Format):
    name = "e8p"

    @staticmethod
    def tensor_specs(cfg: dict) -> dict:
        return code_specs(cfg["bits"], cfg["out_features"], cfg["in_features"])

    @staticmethod
    def decode(t: dict, cfg: dict) -> torch.Tensor:
        """Torch reference decode: fp32 [N, K]."""
        out, inp = cfg["out_features"], cfg["in_features"]
        w = e8p_decode(t["codes"])
        sc = t["scales"].to(device=w.device, dtype=torch.float32)  # a tensor, not floats: gradients reach the scales
        w = w * sc[0]
        if cfg["bits"] == 4:
            w = w + e8p_decode(t["codes2"]) * sc[1]
        elif cfg["bits"] == 3:
            w = w + e8_decode(t["codes2"]) * sc[1]
        return w.reshape(out, inp)
