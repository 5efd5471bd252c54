"""The lookup-table format ("lut"): codes index a small table of values; one fp16 scale per row and group.

    W̃[n, k] = scale[n, g(k)] · table[code(n, k), k mod d]        g(k) = k // group_size (shorter last group)

with d = 1 (scalar grids: NF4, any4, HIGGS d=1) or d = 2 (HIGGS 2-d grids: one code per pair of consecutive
input features, the pair's two values are a point of a 2-d grid; group sizes are even so no pair straddles
two groups). The table is either shared by the whole layer ("table": "shared", [T, d], e.g. the NF4 values or
the Gaussian grid) or one per output row ("table": "row", [N, T], d = 1: any4's learned values).

Optionally (HIGGS) the layer was quantized after a randomized Hadamard rotation of its input dimension,
W̃ = W Vᵀ with V = T·diag(s) (llmq.rotation.hadamard: the same transforms as `--rotate hadamard`, input side
only, as in HIGGS): then y = W̃ (V x), and the decoded weight in the original basis is W = W̃ V (each row
transformed back, V.inverse). The sign vector s is stored; the transform size [m, 2^k] is in the config
("lut_had"), and "lut_had_block" = b when V is block-diagonal (every b consecutive inputs rotated on their own,
HIGGS's hadamard_size).

Optionally (HIGGS `column_scale`) the layer was also divided column by column before the rotation: W = A·diag(c)
with A = W diag(c)⁻¹ quantized (then rotated, as above). Then y = W̃ (V (c ⊙ x)) and the decoded weight is
(W̃ V)·diag(c); the input scale c (fp16, one per input feature) is stored.

Per linear layer `p`:
    p.qweight    int32 [N, ceil(ceil(K/d)·b_c/32)]   codes of b_c = bits·d bits, dense bit-packed (packing.py)
    p.scales     fp16  [N, n_groups]
    p.table      fp16  [T, d] (shared) or [N, T] (row), T = 2^b_c
    p.lut_signs  int32 [ceil(K/32)]                  rotated layers only: the signs, one bit each
    p.lut_input_scale fp16 [K]                       column-scaled layers only: c
Every one of these counts in the bits per weight (`llmq inspect` sums the stored bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .intq import default_group_index, n_groups
from .packing import pack_bits, packed_words, unpack_bits


def code_count(in_features: int, dim: int) -> int:
    return -(-in_features // dim)


@dataclass
class LutQuantized:
    codes: torch.Tensor  # int [N, ceil(K/d)] in [0, 2^(bits·d))
    scales: torch.Tensor  # fp16 [N, G]
    table: torch.Tensor  # fp16 [T, d] (shared) or [N, T] (row)
    bits: int  # bits per weight of the codes (code width / d)
    dim: int
    group_size: int
    in_features: int
    grid: str  # nf4 | any4 | higgs (informational)
    signs: torch.Tensor | None = None  # ±1 [K]: the input rotation's signs (HIGGS)
    hadamard_block: int | None = None  # rotation in independent blocks of this many inputs (None: the whole row)
    table_kind: str = "shared"  # shared [T, d] | row [N, T]
    input_scale: torch.Tensor | None = None  # fp16 [K]: W = (W̃ V)·diag(c) (HIGGS column_scale)

    def layer_config(self) -> dict:
        from ..rotation.hadamard import factor

        cfg = {"format": "lut", "grid": self.grid, "bits": self.bits, "dim": self.dim, "table": self.table_kind,
               "group_size": self.group_size, "sym": True, "in_features": self.in_features,
               "out_features": self.codes.shape[0]}
        if self.signs is not None:
            cfg["lut_had"] = list(factor(self.hadamard_block or self.in_features))
            if self.hadamard_block:
                cfg["lut_had_block"] = self.hadamard_block
        if self.input_scale is not None:
            cfg["lut_input_scale"] = True
        return cfg

    def pack(self) -> dict[str, torch.Tensor]:
        t = {"qweight": pack_bits(self.codes, self.bits * self.dim),
             "scales": self.scales.to(torch.float16).contiguous(),
             "table": self.table.to(torch.float16).contiguous()}
        if self.signs is not None:
            from ..rotation.incoherence import pack_signs

            t["lut_signs"] = pack_signs(self.signs)
        if self.input_scale is not None:
            t["lut_input_scale"] = self.input_scale.to(torch.float16).contiguous()
        return t

    def dequantize(self) -> torch.Tensor:
        return LutFormat.dequantize(self.pack(), self.layer_config())


def decode_rotated(t: dict[str, torch.Tensor], cfg: dict) -> torch.Tensor:
    """The weight in the basis it was quantized in (W̃, before undoing any input rotation): fp32 [N, K]."""
    k, d, cb = cfg["in_features"], cfg["dim"], cfg["bits"] * cfg["dim"]
    codes = unpack_bits(t["qweight"], cb, code_count(k, d)).long()
    table = t["table"].to(torch.float32)
    if cfg["table"] == "row":
        vals = torch.gather(table, 1, codes)
    else:
        vals = table[codes].reshape(codes.shape[0], -1)[:, :k]  # [N, K/d, d] -> [N, K]
    gi = default_group_index(k, cfg["group_size"]).to(vals.device)
    return vals.mul_(t["scales"].to(torch.float32)[:, gi])


def input_rotation(t: dict[str, torch.Tensor], cfg: dict):
    """The layer's input rotation V (a RandomizedHadamard), or None."""
    if "lut_had" not in cfg:
        return None
    from ..rotation.hadamard import input_hadamard
    from ..rotation.incoherence import unpack_signs

    rh = input_hadamard(unpack_signs(t["lut_signs"], cfg["in_features"]), cfg.get("lut_had_block"))
    if [rh.m, rh.p] != list(cfg["lut_had"]):
        raise ValueError(f"layer stores a Hadamard transform {cfg['lut_had']} but this llmq builds {[rh.m, rh.p]}")
    return rh


class LutFormat:
    name = "lut"

    @staticmethod
    def tensor_specs(cfg: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out, inp, d = cfg["out_features"], cfg["in_features"], cfg["dim"]
        cb = cfg["bits"] * d
        T = 1 << cb
        specs = {"qweight": ((out, packed_words(code_count(inp, d), cb)), torch.int32),
                 "scales": ((out, n_groups(inp, cfg["group_size"])), torch.float16),
                 "table": ((out, T) if cfg["table"] == "row" else (T, d), torch.float16)}
        if "lut_had" in cfg:
            specs["lut_signs"] = ((packed_words(inp, 1),), torch.int32)
        if cfg.get("lut_input_scale"):
            specs["lut_input_scale"] = ((inp,), torch.float16)
        return specs

    @staticmethod
    def dequantize(t: dict[str, torch.Tensor], cfg: dict) -> torch.Tensor:
        """Packed tensors -> fp32 weight [N, K] in the layer's original basis (y = x Wᵀ)."""
        w = decode_rotated(t, cfg)
        rh = input_rotation(t, cfg)
        if rh is not None:
            w = rh.inverse(w)
        if cfg.get("lut_input_scale"):
            w = w.mul_(t["lut_input_scale"].to(torch.float32))
        return w
