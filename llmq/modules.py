"""`LlmqLinear`: a linear layer that computes from packed weights (Triton on CUDA; on CPU llmq.kernels.cpu, else the
torch reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .formats import get_format
from .kernels import cpu
from .kernels.dispatch import quant_linear
from .rotation.incoherence import online_rotation, rotation_tensor_specs


def layer_tensor_specs(cfg: dict) -> dict:
    """Every tensor a packed layer stores (besides weight/bias): its format's, plus a rotation's signs."""
    return {**get_format(cfg["format"]).tensor_specs(cfg), **rotation_tensor_specs(cfg)}


class LlmqLinear(nn.Module):
    def __init__(self, layer_config: dict, bias: bool = False, device=None):
        super().__init__()
        self.layer_config = dict(layer_config)
        self.format = get_format(layer_config["format"])
        self.in_features = layer_config["in_features"]
        self.out_features = layer_config["out_features"]
        # Zero-length `weight`: a checkpoint saved from this module makes a plain (non-llmq) transformers
        # load fail with a size mismatch instead of silently initialising random weights.
        self.register_buffer("weight", torch.zeros(0, dtype=torch.float16, device=device))
        for name, (shape, dtype) in layer_tensor_specs(layer_config).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device), requires_grad=False) if bias else None

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        """The format's tensors (a rotation's sign vectors are not part of the packed weight)."""
        return {k: v for k, v in self.named_buffers(recurse=False) if k != "weight" and k not in rotation_tensor_specs(self.layer_config)}

    def dequantize(self) -> torch.Tensor:
        """The packed weight as fp32 [out, in]; for a rotated layer, in its rotated basis (U W Vᵀ, llmq.rotation.incoherence)."""
        return self.format.dequantize(self.packed_tensors(), self.layer_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu.use_cpu_path(x):
            fast = self._cpu_state(x.dtype)
            if fast is not None:
                return fast(x)
        rot = online_rotation(self)  # a layer quantized in a Hadamard-rotated basis (llmq.rotation.incoherence)
        if rot is not None:
            return rot.output(self._forward_packed(rot.input(x)))
        return self._forward_packed(x)

    def _forward_packed(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.packed_tensors(), self.layer_config, self.bias)  # Triton on CUDA, torch on CPU

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
