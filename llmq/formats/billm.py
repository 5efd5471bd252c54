"""The BiLLM format ("billm"): binarized weights with a residual second basis on salient columns and a small
sparse group of large weights, at about 1.1–1.3 stored bits per weight (everything counted).

Per linear layer `p` (N outputs, K inputs, blocks of B = 128 columns, nb = ceil(K/B)):
    p.signs        int32 [N, ceil(K/32)]   first-basis sign of every weight (1 bit/weight)
    p.salient_idx  int16 [S]               the salient columns (the per-block column masks, as sorted indices)
    p.signs2       int32 [N, ceil(S/32)]   residual (second-basis) signs, salient columns only, in column order
    p.sparse_idx   uint8 [N, nb, r]        per row and block, the in-block offsets of the sparse group (255 = empty);
                                           only when r > 0
    p.scales       fp16  [N, 4]            per row: α_c (concentrated), α_s (sparse), α_a, α_b (salient bases)
Decoding (σ = ±1 from the sign bits):
    W[n, k] = α_c σ1                                  non-salient, concentrated
            = α_s σ1                                  non-salient, sparse (k listed in sparse_idx of row n)
            = α_a σ1 + α_b σ2                         salient column
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Format, register_format
from .bitplanes import pack_signs, sign_words, sparse_mask, unpack_signs

BLOCK = 128
SCALE_NAMES = ("conc", "sparse", "salient1", "salient2")


def billm_bits(out: int, inp: int, salient: int, sparse_per_block: int, block: int = BLOCK) -> int:
    """Exact stored bits of a layer in this format (what `llmq inspect` will count from the file)."""
    nb = -(-inp // block)
    return (32 * out * sign_words(inp) + 16 * salient + 32 * out * sign_words(salient)
            + 8 * out * nb * sparse_per_block + 16 * out * 4)


@dataclass
class BillmQuantized:
    signs: torch.Tensor  # ±1 fp32/int [N, K]
    salient: torch.Tensor  # int64 [S] sorted column indices
    signs2: torch.Tensor  # ±1 [N, S]
    sparse_idx: torch.Tensor  # uint8 [N, nb, r]
    scales: torch.Tensor  # fp16 [N, 4]
    block: int = BLOCK

    def layer_config(self) -> dict:
        out, inp = self.signs.shape
        return {"format": "billm", "bits": 1, "group_size": self.block, "sym": True, "in_features": inp,
                "out_features": out, "salient_columns": int(self.salient.numel()),
                "sparse_per_block": int(self.sparse_idx.shape[2])}

    def pack(self) -> dict[str, torch.Tensor]:
        t = {"signs": pack_signs(self.signs), "salient_idx": self.salient.to(torch.int16).contiguous(),
             "signs2": pack_signs(self.signs2), "scales": self.scales.to(torch.float16).contiguous()}
        if self.sparse_idx.shape[2]:
            t["sparse_idx"] = self.sparse_idx.to(torch.uint8).contiguous()
        return t

    def dequantize(self) -> torch.Tensor:
        return BillmFormat.dequantize(self.pack(), self.layer_config())


@register_format
class BillmFormat(Format):
    name = "billm"

    @staticmethod
    def tensor_specs(cfg: dict) -> dict:
        out, inp, s, r = cfg["out_features"], cfg["in_features"], cfg["salient_columns"], cfg["sparse_per_block"]
        b = cfg.get("group_size") or BLOCK
        specs = {"signs": ((out, sign_words(inp)), torch.int32), "salient_idx": ((s,), torch.int16),
                 "signs2": ((out, sign_words(s)), torch.int32), "scales": ((out, 4), torch.float16)}
        if r:
            specs["sparse_idx"] = ((out, -(-inp // b), r), torch.uint8)
        return specs

    @staticmethod
    def decode(t: dict, cfg: dict) -> torch.Tensor:
        out, inp, s = cfg["out_features"], cfg["in_features"], cfg["salient_columns"]
        b = cfg.get("group_size") or BLOCK
        sc = t["scales"].to(torch.float32)
        s1 = unpack_signs(t["signs"], inp)
        alpha = sc[:, 0:1].expand(out, inp)
        if "sparse_idx" in t:
            alpha = torch.where(sparse_mask(t["sparse_idx"], b, inp), sc[:, 1:2], alpha)
        w = s1 * alpha
        if s:
            cols = t["salient_idx"].to(torch.int64) & 0xFFFF  # int16 on disk: columns up to 65535
            w[:, cols] = s1[:, cols] * sc[:, 2:3] + unpack_signs(t["signs2"], s) * sc[:, 3:4]
        return w
