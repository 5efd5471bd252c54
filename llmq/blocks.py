"""Running one decoder block at a time outside its model: a meta-device skeleton of the model gives
each block's class and layout; a real rotary embedding gives the position embeddings."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import DecoderAdapter


class StopForward(Exception):
    """Raised by a hook that has seen what it needed; ends that batch's pass through the block."""


def forward_block(block: nn.Module, hidden: torch.Tensor, position_embeddings, batch_size: int = 1, keep_output: bool = True):
    """hidden [n, L, d] -> [n, L, d], `batch_size` sequences at a time, causal attention (sdpa, no mask).
    With keep_output=False the pass only feeds hooks (which may stop it early) and returns None."""
    seqlen = hidden.shape[1]
    pos = torch.arange(seqlen).unsqueeze(0)
    out = torch.empty_like(hidden) if keep_output else None
    with torch.no_grad(), dequantized_once(block):
        for s in range(0, hidden.shape[0], batch_size):
            h = hidden[s : s + batch_size]
            try:
                y = block(h, attention_mask=None, position_ids=pos, position_embeddings=position_embeddings, use_cache=False)
            except StopForward:
                continue
            if keep_output:
                out[s : s + batch_size] = y[0] if isinstance(y, tuple) else y
    return out


@contextmanager
def dequantized_once(block: nn.Module):
    """While many calibration samples pass through a block, each packed layer computes with its weight
    dequantized once (the same values its packed matmul uses) instead of unpacking it on every call."""
    from .modules import LlmqLinear

    patched = [m for m in block.modules() if isinstance(m, LlmqLinear)]
    for m in patched:
        w, b = m.dequantize(), m.bias
        m._forward_packed = lambda x, w=w, b=b: F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
    try:
        yield
    finally:
        for m in patched:
            del m._forward_packed


class BlockFactory:
    def __init__(self, config, adapter: DecoderAdapter):
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(config)
        config._attn_implementation = "sdpa"  # causal without an explicit mask
        config.use_cache = False
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.config = config
        self.adapter = adapter
        rotary = self.skeleton.get_submodule(adapter.blocks.rsplit(".", 1)[0] + ".rotary_emb")
        self.rotary = type(rotary)(config=config)
        self.num_blocks = len(self.skeleton.get_submodule(adapter.blocks))

    def meta_block(self, i: int) -> nn.Module:
        """Block i with no storage yet: tensors are attached with `assign`, so nothing is allocated twice."""
        return copy.deepcopy(self.skeleton.get_submodule(f"{self.adapter.blocks}.{i}")).eval()

    def block(self, i: int, state: dict[str, torch.Tensor]) -> nn.Module:
        b = self.meta_block(i)
        b.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True, assign=True)
        return b

    def position_embeddings(self, seqlen: int):
        x = torch.zeros(1, seqlen, 1)
        return self.rotary(x, torch.arange(seqlen).unsqueeze(0))
