"""CPU forward of LlmqLinear without a decode per call (the reference decodes the whole weight every forward).

Built once per layer at its first CPU forward (`prepare`), kept on the module, never saved:

- **int, ≤ 4 bits**, groups that tile into 32/64/128/256-column blocks (after sorting the columns by group for
  act-order; a 128-group layout with a shorter last group on 576-wide rows is the same at 64): torch's fused
  `_weight_int4pack_mm_for_cpu`, which computes w = (q − 8)·s + z per group. llmq's w = s·(code − zero) is that
  with q = code, z = s·(8 − zero), exact but for s and z rounded to bf16. Repacked codes: K/2 bytes per row.
- **int, 5–8 bits, one group per row** (8 bits symmetric only, so code − zero fits an int8), K a multiple of 16:
  `_weight_int8pack_mm`, w = s·q with q = code − zero, exact but for s rounded to bf16. K bytes per row.
- **everything else** (lut, e8p, vq, billm, pbllm, ternary, other int layouts) and **every layer with transforms**
  (llmq.transforms: rotated layers, HIGGS): the weight decoded once to the activations' dtype, the layer's
  transforms folded in (W = Uᵀ W̃ V, b = Uᵀ b̃), so a forward is one F.linear, like the fp model, at the fp model's memory for that layer.
  `LLMQ_CPU_WEIGHT_CACHE=0` turns this cache off: those layers then decode on every forward (the reference).

Both fused kernels are only vectorised for bf16 activations (fp32/fp16 inputs run 20–40× slower there), so x is
rounded to bf16 and the result cast back: their results match the reference to bf16 rounding, not bit for bit.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .dispatch import KERNEL_DTYPES
from .reference import group_index, unpack_codes

INT4_GROUPS = (256, 128, 64, 32)  # the group sizes _weight_int4pack_mm_for_cpu takes
ONE_THREAD_WORK = 1 << 24  # multiply-adds up to which a fused call runs on one thread (see FusedInt)


def use_cpu_path(x: torch.Tensor) -> bool:
    """The fast path: CPU fp32/fp16/bf16 activations, LLMQ_KERNELS auto (`torch` keeps the reference), no autograd
    (the fused kernels have no derivative)."""
    return (x.device.type == "cpu" and x.dtype in KERNEL_DTYPES and os.environ.get("LLMQ_KERNELS", "auto") == "auto"
            and not (x.requires_grad and torch.is_grad_enabled()))


def cache_enabled() -> bool:
    return os.environ.get("LLMQ_CPU_WEIGHT_CACHE", "1") != "0"


class FusedInt:
    """x Wᵀ (+ bias) on one of torch's fused low-bit CPU kernels; `weight`, `scales` are the repacked tensors."""

    def __init__(self, op, weight, scales, group=None, perm=None):
        self.op, self.weight, self.scales, self.group, self.perm = op, weight, scales, group, perm
        self.bias = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if self.perm is not None:
            x2 = x2[:, self.perm]
        x2 = x2.to(torch.bfloat16).contiguous()
        args = (x2, self.weight, self.scales) if self.group is None else (x2, self.weight, self.group, self.scales)
        threads = torch.get_num_threads()
        if threads > 1 and x2.numel() * self.weight.shape[0] <= ONE_THREAD_WORK:
            # These kernels split even one row over all threads, and on cores shared with other processes every such
            # join can wait out a scheduler slice (8 ms measured, against ~50 µs for a SmolLM2 layer on one thread).
            torch.set_num_threads(1)
            try:
                y = self.op(*args)
            finally:
                torch.set_num_threads(threads)
        else:
            y = self.op(*args)
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def fused_int(t: dict[str, torch.Tensor], cfg: dict) -> FusedInt | None:
    """The layer on a fused kernel, or None where none maps exactly (see the module docstring)."""
    bits, k, n = cfg["bits"], cfg["in_features"], cfg["out_features"]
    codes = unpack_codes(t["qweight"], bits, k)
    gi = group_index(cfg, t, codes.device)
    zero = t["qzeros"].to(torch.float32) if "qzeros" in t else torch.full_like(t["scales"], 1 << (bits - 1), dtype=torch.float32)
    s = t["scales"].to(torch.float32)
    if bits <= 4:
        if n % 16:
            return None
        perm = torch.argsort(gi, stable=True) if "g_idx" in t else None  # act-order: make each group contiguous
        if perm is not None:
            gi, codes = gi[perm], codes[:, perm]
        # the largest kernel group whose blocks each lie in one llmq group
        kg = next((g for g in INT4_GROUPS if k % g == 0 and bool((gi.view(-1, g) == gi.view(-1, g)[:, :1]).all())), None)
        if kg is None:
            return None
        first = gi[::kg]  # the llmq group of each kernel group
        sz = torch.stack([s[:, first], s[:, first] * (8 - zero[:, first])], -1).transpose(0, 1)  # [K/kg, N, 2]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        return FusedInt(torch.ops.aten._weight_int4pack_mm_for_cpu, packed, sz.to(torch.bfloat16).contiguous(), kg, perm)
    if s.shape[1] != 1 or (bits == 8 and "qzeros" in t) or k % 16:  # other K: the kernel crashes or reads garbage
        return None
    q = (codes - zero.to(torch.int32)).to(torch.int8)  # in [−128, 127]: code − 2^(b−1), or code − zero for b ≤ 7
    return FusedInt(torch.ops.aten._weight_int8pack_mm, q.contiguous(), s[:, 0].to(torch.bfloat16).contiguous())


class DenseLinear:
    """The decoded weight kept in the activations' dtype: a forward is one F.linear, as in the fp model."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Transformed:
    """A fused int kernel between a layer's online transforms (cache off): y = O(Q̃ (T x) + b̃)."""

    def __init__(self, inner: FusedInt, transforms):
        self.inner, self.t = inner, transforms

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from llmq.transforms import apply

        return apply(self.t.outputs, self.inner(apply(self.t.online, x)))


def prepare(module, dtype: torch.dtype):
    """What `module` (an LlmqLinear) runs for CPU activations of `dtype`: a callable x -> y, or None (reference)."""
    from llmq.transforms import apply, fold_inputs

    cfg, t = module.layer_config, module.layer_transforms()
    bias = None if module.bias is None else module.bias.detach().to(dtype)
    # a rotated layer with the cache on: folded dense beats Hadamard transforms around a fused kernel
    if cfg["format"] == "int" and not t.fused and (not (t.online or t.outputs) or not cache_enabled()):
        fused = fused_int(module.packed_tensors(), cfg)
        if fused is not None:
            fused.bias = bias
            return Transformed(fused, t) if t.online or t.outputs else fused
    if not cache_enabled():
        return None
    w = module.dequantize()
    if t.online or t.outputs:  # W = O W̃ T: the online input transforms folded into the rows, the outputs into the columns
        w = apply(t.outputs, fold_inputs(w, t.online).T).T
        bias = None if bias is None else apply(t.outputs, module.bias.detach().float()).to(dtype)
    return DenseLinear(w.to(dtype).contiguous(), bias)
