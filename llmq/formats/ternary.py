"""The ternary format ("ternary", 1.58 bits): w = α · t, t ∈ {−1, 0, +1}, one fp16 α per row and group.

Per linear layer `p`:
    p.qweight  uint8 [N, ceil(K/5)]   trits packed five per byte (llmq.formats.bitplanes: digit t+1, base 3)
    p.scales   fp16  [N, n_groups]
Stored bits per weight: 8/5 = 1.6 for the trits (log2 3 = 1.585 is the entropy bound) plus 16 / group_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Format, register_format
from .bitplanes import pack_trits, trit_bytes, unpack_trits
from .intq import default_group_index, n_groups


@dataclass
class TernaryQuantized:
    trits: torch.Tensor  # [N, K] in {−1, 0, 1}
    scales: torch.Tensor  # fp16 [N, G]
    group_size: int

    def layer_config(self) -> dict:
        out, inp = self.trits.shape
        return {"format": "ternary", "bits": 1.58, "group_size": self.group_size, "sym": True,
                "in_features": inp, "out_features": out}

    def pack(self) -> dict[str, torch.Tensor]:
        return {"qweight": pack_trits(self.trits), "scales": self.scales.to(torch.float16).contiguous()}

    def dequantize(self) -> torch.Tensor:
        return TernaryFormat.dequantize(self.pack(), self.layer_config())


@register_format
class TernaryFormat(Format):
    name = "ternary"

    @staticmethod
    def tensor_specs(cfg: dict) -> dict:
        out, inp = cfg["out_features"], cfg["in_features"]
        return {"qweight": ((out, trit_bytes(inp)), torch.uint8),
                "scales": ((out, n_groups(inp, cfg["group_size"])), torch.float16)}

    @staticmethod
    def decode(t: dict, cfg: dict) -> torch.Tensor:
        inp = cfg["in_features"]
        gi = default_group_index(inp, cfg["group_size"]).to(t["qweight"].device)
        return unpack_trits(t["qweight"], inp) * t["scales"].to(torch.float32)[:, gi]
