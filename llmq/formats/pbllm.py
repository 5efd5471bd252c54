"""The PB-LLM format ("pbllm"): partially binarized weights. A fraction of salient weights is kept at 8 bits in a
fixed-size sparse layout (ELL: the same number of slots per row and 128-column block), the rest is binarized.

Per linear layer `p` (N outputs, K inputs, blocks of B = 128 columns, nb = ceil(K/B), r slots per row-block):
    p.signs         int32 [N, ceil(K/32)]    sign of every weight (1 bit/weight; unused under a salient weight)
    p.scales        fp16  [N, n_groups]      α per row and group of `group_size` columns (the binarized part)
    p.sparse_idx    uint8 [N, nb, r]         in-block offsets of the salient weights (255 = empty slot)
    p.sparse_q      int8  [N, nb, r]         their 8-bit codes, symmetric: value = sparse_scale · q, q ∈ [−127, 127]
    p.sparse_scale  fp16  [N]                per-row scale of the 8-bit codes
Decoding: W[n, k] = α[n, k // group_size] σ[n, k], except at the listed positions, where W = sparse_scale[n] · q.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Format, register_format
from .bitplanes import pack_signs, sign_words, sparse_columns, unpack_signs
from .intq import default_group_index, n_groups

BLOCK = 128


def pbllm_bits(out: int, inp: int, group_size: int, slots: int, block: int = BLOCK) -> int:
    nb = -(-inp // block)
    return 32 * out * sign_words(inp) + 16 * out * n_groups(inp, group_size) + 16 * out * nb * slots + 16 * out


@dataclass
class PbllmQuantized:
    signs: torch.Tensor  # ±1 [N, K]
    scales: torch.Tensor  # fp16 [N, G]
    sparse_idx: torch.Tensor  # uint8 [N, nb, r]
    sparse_q: torch.Tensor  # int8 [N, nb, r]
    sparse_scale: torch.Tensor  # fp16 [N]
    group_size: int
    block: int = BLOCK

    def layer_config(self) -> dict:
        out, inp = self.signs.shape
        return {"format": "pbllm", "bits": 1, "group_size": self.group_size, "sym": True, "in_features": inp,
                "out_features": out, "block": self.block, "salient_per_block": int(self.sparse_idx.shape[2])}

    def pack(self) -> dict[str, torch.Tensor]:
        return {"signs": pack_signs(self.signs), "scales": self.scales.to(torch.float16).contiguous(),
                "sparse_idx": self.sparse_idx.to(torch.uint8).contiguous(),
                "sparse_q": self.sparse_q.to(torch.int8).contiguous(),
                "sparse_scale": self.sparse_scale.to(torch.float16).contiguous()}

    def dequantize(self) -> torch.Tensor:
        return PbllmFormat.dequantize(self.pack(), self.layer_config())


@register_format
class PbllmFormat(Format):
    name = "pbllm"

    @staticmethod
    def tensor_specs(cfg: dict) -> dict:
        out, inp, r, b = cfg["out_features"], cfg["in_features"], cfg["salient_per_block"], cfg.get("block", BLOCK)
        nb = -(-inp // b)
        return {"signs": ((out, sign_words(inp)), torch.int32),
                "scales": ((out, n_groups(inp, cfg["group_size"])), torch.float16),
                "sparse_idx": ((out, nb, r), torch.uint8), "sparse_q": ((out, nb, r), torch.int8),
                "sparse_scale": ((out,), torch.float16)}

    @staticmethod
    def decode(t: dict, cfg: dict) -> torch.Tensor:
        out, inp, b = cfg["out_features"], cfg["in_features"], cfg.get("block", BLOCK)
        gi = default_group_index(inp, cfg["group_size"]).to(t["signs"].device)
        w = unpack_signs(t["signs"], inp) * t["scales"].to(torch.float32)[:, gi]
        col = sparse_columns(t["sparse_idx"], b, inp)  # empty slots -> the spare column `inp`, dropped below
        vals = t["sparse_q"].to(torch.float32).reshape(out, -1) * t["sparse_scale"].to(torch.float32)[:, None]
        w = torch.cat([w, torch.zeros(out, 1, dtype=w.dtype, device=w.device)], 1)
        w.scatter_(1, col, vals)
        return w[:, :inp]
