"""Per-layer incoherence processing (QuIP#): quantize a linear layer y = W x + b in a rotated basis.

    W̃ = U W Vᵀ,   H̃ = V H Vᵀ,   b̃ = U b          U = T_out·diag(s_out), V = T_in·diag(s_in)

with T the orthogonal Hadamard transform of the size (llmq.rotation.hadamard) and s seeded random signs.
Any method then quantizes W̃ against H̃ (so GPTQ's ‖(W̃ − Q̃)X̃‖ equals ‖(W − UᵀQ̃V)X‖: the rotation
changes nothing but the grid's view of the weights, spreading outliers so low-bit grids waste less
range). At inference the layer computes  y = Uᵀ (Q̃ (V x) + b̃)  = UᵀQ̃V x + b: the input transform
before the packed matmul and the inverse output transform after it, O(n log n) each.

Layers that read the same input (q/k/v, gate/up) share s_in, so their Hessian is rotated once. Stored per
layer `p`: `p.had_in_signs`, `p.had_out_signs` (the signs, one bit each, packed like 1-bit codes), and in
its layer config  "rotate": "hadamard", "had_in": [m, 2^k], "had_out": [m, 2^k]  (the transform sizes).
The layer's `bias` is stored in the rotated basis (b̃), so the packed matmul path is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.packing import pack_bits, packed_words, unpack_bits
from .hadamard import RandomizedHadamard, factor, random_signs

SIGN_TENSORS = ("had_in_signs", "had_out_signs")


def pack_signs(s: torch.Tensor) -> torch.Tensor:
    return pack_bits((s > 0).to(torch.uint8).unsqueeze(0), 1)[0]


def unpack_signs(t: torch.Tensor, n: int) -> torch.Tensor:
    return unpack_bits(t.unsqueeze(0).cpu(), 1, n)[0].to(torch.float32).mul_(2).sub_(1)


class LayerIncoherence:
    def __init__(self, s_in: torch.Tensor, s_out: torch.Tensor):
        self.V = RandomizedHadamard(s_in)
        self.U = RandomizedHadamard(s_out)

    @classmethod
    def for_layer(cls, in_key: str, out_key: str, in_features: int, out_features: int, seed: int = 0):
        """Signs drawn from the names: `in_key` is shared by layers that read the same input."""
        return cls(random_signs(in_features, in_key + ":in", seed), random_signs(out_features, out_key + ":out", seed))

    # quantization-time transforms (fp32)
    def weight(self, w: torch.Tensor) -> torch.Tensor:
        """U W Vᵀ: V on every row, then U on every column."""
        return self.U.forward(self.V.forward(w).T).T.contiguous()

    def hessian(self, h: torch.Tensor) -> torch.Tensor:
        """V H Vᵀ."""
        return self.V.forward(self.V.forward(h).T).T.contiguous()

    def bias(self, b: torch.Tensor) -> torch.Tensor:
        return self.U.forward(b)

    # inference-time transforms
    def input(self, x: torch.Tensor) -> torch.Tensor:
        return self.V.forward(x)

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return self.U.inverse(y)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"had_in_signs": pack_signs(self.V.signs), "had_out_signs": pack_signs(self.U.signs)}

    def layer_config(self) -> dict:
        return {"rotate": "hadamard", "had_in": [self.V.m, self.V.p], "had_out": [self.U.m, self.U.p]}

    @classmethod
    def from_tensors(cls, cfg: dict, tensors: dict[str, torch.Tensor]) -> "LayerIncoherence":
        inc = cls(unpack_signs(tensors["had_in_signs"], cfg["in_features"]),
                  unpack_signs(tensors["had_out_signs"], cfg["out_features"]))
        for key, t in (("had_in", inc.V), ("had_out", inc.U)):
            if list(cfg[key]) != [t.m, t.p]:  # a checkpoint from a build that factors sizes differently
                raise ValueError(f"layer stores a Hadamard transform {cfg[key]} but this llmq builds {[t.m, t.p]} for size {t.n}")
        return inc


def rotation_tensor_specs(cfg: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Extra tensors a rotated layer stores, beside its format's."""
    if cfg.get("rotate") != "hadamard":
        return {}
    return {"had_in_signs": ((packed_words(cfg["in_features"], 1),), torch.int32),
            "had_out_signs": ((packed_words(cfg["out_features"], 1),), torch.int32)}


def online_rotation(module: nn.Module) -> LayerIncoherence | None:
    """The layer's transforms, built once from its sign buffers (rebuilt if the buffers are replaced)."""
    cfg = module.layer_config
    if cfg.get("rotate") != "hadamard":
        return None
    bufs = [module._buffers[k] for k in SIGN_TENSORS]
    key = tuple((b.data_ptr(), b.device) for b in bufs)
    cached = module.__dict__.get("_llmq_rotation")
    if cached is None or cached[0] != key:
        cached = (key, LayerIncoherence.from_tensors(cfg, dict(zip(SIGN_TENSORS, bufs))))
        module.__dict__["_llmq_rotation"] = cached
    return cached[1]


class HadamardLinear(nn.Module):
    """An unquantized linear layer held in its rotated basis: y = Uᵀ(W̃ (V x) + b̃). The same online path as a
    rotated LlmqLinear without the quantization; used to check that the rotation preserves the function."""

    def __init__(self, lin: nn.Linear, inc: LayerIncoherence):
        super().__init__()
        self.inc = inc
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.weight = nn.Parameter(inc.weight(lin.weight.detach().float()), requires_grad=False)
        self.bias = None if lin.bias is None else nn.Parameter(inc.bias(lin.bias.detach().float()), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inc.output(F.linear(self.inc.input(x), self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)))

