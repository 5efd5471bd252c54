"""Per-layer incoherence processing (QuIP#): quantize a linear layer y = W x + b in a rotated basis.

    W̃ = U W Vᵀ,   H̃ = V H Vᵀ,   b̃ = U b          U = T_out·diag(s_out), V = T_in·diag(s_in)

with T the orthogonal Hadamard transform of the size (llmq.rotation.hadamard) and s seeded random signs.
Any method then quantizes W̃ against H̃ (so GPTQ's ‖(W̃ − Q̃)X̃‖ equals ‖(W − UᵀQ̃V)X‖: the rotation
changes nothing but the grid's view of the weights, spreading outliers so low-bit grids waste less
range). At inference the layer computes  y = Uᵀ (Q̃ (V x) + b̃)  = UᵀQ̃V x + b: the input transform
before the packed matmul and the inverse output transform after it, O(n log n) each.

Layers that read the same input (q/k/v, gate/up) share s_in, so their Hessian is rotated once. Stored per
layer `p`: `p.had_in_signs`, `p.had_out_signs` (the signs, one bit each, packed like 1-bit codes), and in
its layer config "rotate": "hadamard" and the two transforms (llmq.transforms): V first in "input_transforms",
Uᵀ last in "output_transforms", both applied online by LlmqLinear. The layer's `bias` is stored in the rotated
basis (b̃), so the packed matmul path is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.bitplanes import pack_signs
from ..transforms import INPUT, OUTPUT, hadamard_entry
from ..transforms.hadamard import RandomizedHadamard, random_signs


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

    def layer_config(self, cfg: dict | None = None) -> dict:
        """The format's layer config `cfg` with the rotation added: V before its input transforms, Uᵀ after its output
        ones (the rotation is outermost: y = Uᵀ (Q̃ (V x) + b̃))."""
        cfg = dict(cfg or {})
        cfg["rotate"] = "hadamard"
        cfg[INPUT] = [hadamard_entry(self.V.n, "had_in_signs"), *cfg.get(INPUT, [])]
        cfg[OUTPUT] = [*cfg.get(OUTPUT, []), hadamard_entry(self.U.n, "had_out_signs", inverse=True)]
        return cfg


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

