"""`LlmqLinear`: a linear layer that computes from packed weights (Triton on CUDA; on CPU llmq.kernels.cpu, else the
torch reference)."""

from __future__ import annotations

import torch
from torch import nn

from . import transforms
from .formats import get_format
from .kernels import cpu
from .kernels.dispatch import quant_linear


def layer_tensor_specs(cfg: dict) -> dict:
    """Every tensor a packed layer stores (besides weight/bias): its format's, plus its transforms' (llmq.transforms)."""
    return {**get_format(cfg["format"]).tensor_specs(cfg), **transforms.tensor_specs(cfg)}


class LlmqLinear(nn.Module):
    """y = O(W̃ (T x) + b̃): the packed weight W̃ between the layer's transforms (llmq.transforms): online input
    transforms applied here, fused ones by the kernel, output transforms after the bias."""

    def __init__(self, layer_config: dict, bias: bool = False, device=None):
        super().__init__()
        self.layer_config = transforms.normalize(dict(layer_config))  # version-1 checkpoints: the old keys, read once
        self.format = get_format(layer_config["format"])
        self.in_features = layer_config["in_features"]
        self.out_features = layer_config["out_features"]
        # Zero-length `weight`: a checkpoint saved from this module makes a plain (non-llmq) transformers
        # load fail with a size mismatch instead of silently initialising random weights.
        self.register_buffer("weight", torch.zeros(0, dtype=torch.float16, device=device))
        for name, (shape, dtype) in layer_tensor_specs(self.layer_config).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device), requires_grad=False) if bias else None

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The format's tensors and its fused transforms' (the online transforms' signs are not part of the packed weight)."""
        online = {e.get("signs") or e.get("tensor") for side in (transforms.INPUT, transforms.OUTPUT)
                  for e in transforms.entries(self.layer_config, side) if not e.get("fused")}
        return {k: v for k, v in self.named_buffers(recurse=False) if k != "weight" and k not in online}

    def layer_transforms(self) -> transforms.LayerTransforms:
        """The layer's transforms, built once from its buffers (signs unpacked once, not per forward); rebuilt when a
        buffer is replaced or written in place, kept outside the buffers so it is never saved."""
        key = tuple((b.data_ptr(), b.device, b._version) for b in self._buffers.values())
        state = self.__dict__.get("_llmq_transforms")
        if state is None or state[0] != key:
            state = self.__dict__["_llmq_transforms"] = (key, transforms.LayerTransforms(self.layer_config, dict(self.named_buffers(recurse=False))))
        return state[1]

    def dequantize(self) -> torch.Tensor:
        """The weight of the packed matmul as fp32 [out, in] (fused input transforms folded in); for a rotated layer, in
        its rotated basis (U W Vᵀ, llmq.rotation.incoherence)."""
        return transforms.fold_inputs(self.format.decode(self.packed_tensors(), self.layer_config), self.layer_transforms().fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu.use_cpu_path(x):
            fast = self._cpu_state(x.dtype)
            if fast is not None:
                return fast(x)
        t = self.layer_transforms()
        return transforms.apply(t.outputs, self._forward_packed(transforms.apply(t.online, x)))

    def _forward_packed(self, x: torch.Tensor) -> torch.Tensor:
        # Triton on CUDA, torch on CPU
        return quant_linear(x, self.packed_tensors(), self.layer_config, self.bias, self.layer_transforms().fused)

    def _cpu_state(self, dtype: torch.dtype):
        """The CPU forward (llmq.kernels.cpu.prepare), kept outside the buffers so it is never saved; rebuilt when a
        buffer is replaced or written in place (its version changes), or the dtype or LLMQ_CPU_WEIGHT_CACHE does."""
        key = (dtype, cpu.cache_enabled(), *((b.data_ptr(), b._version) for b in self._buffers.values()),
               None if self.bias is None else (self.bias.data_ptr(), self.bias._version))
        state = self.__dict__.get("_llmq_cpu")
        if state is None or state[0] != key:
            self.__dict__.pop("_llmq_cpu", None)  # free the old copy before building the new one
            state = self.__dict__["_llmq_cpu"] = (key, cpu.prepare(self, dtype))
        return state[1]

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_llmq_cpu", None)  # .to() / .cuda() / .half(): the CPU copy is stale
        self.__dict__.pop("_llmq_transforms", None)
        return super()._apply(fn, *args, **kwargs)

    @classmethod
    def from_packed(cls, layer_config: dict, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None):
        m = cls(layer_config, bias=bias is not None, device="meta")
        m._buffers["weight"] = torch.zeros(0, dtype=torch.float16)
        for name, t in tensors.items():
            m._buffers[name] = t
        if bias is not None:
            m.bias = nn.Parameter(bias, requires_grad=False)
        return m

    def extra_repr(self) -> str:
        c = self.layer_config
        return f"{self.in_features}->{self.out_features}, format={c['format']}, bits={c.get('bits')}, group_size={c.get('group_size')}"


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
