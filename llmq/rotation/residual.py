"""Model-level residual-stream rotation (QuaRot / SpinQuant R1, weight-only): the whole model computes
in a rotated basis of the residual stream, at zero inference cost, and stays a plain Llama.

With U = T·diag(s) the orthogonal randomized Hadamard of the hidden size and the residual r → U r:

    RMSNorm fold   a norm's scale γ moves into the layers that read its output: W ← W diag(γ), γ ← 1
                   (RMSNorm with γ = 1 commutes with U: ‖U r‖ = ‖r‖)
    embeddings     E ← E Uᵀ                       (each token's vector e → U e)
    readers        W ← W diag(γ) Uᵀ               q, k, v (input norm), gate, up (post-attention norm),
                                                  lm_head (final norm)
    writers        W ← U W,  b ← U b              o_proj, down_proj
    per head V/O   W_v ← (I ⊗ R) W_v, b_v ← (I ⊗ R) b_v, W_o ← W_o (I ⊗ Rᵀ)   R: randomized Hadamard of
                   head_dim, the same for every head (attention mixes tokens, not head dimensions, and GQA
                   heads read their KV head's rotated values), optional

Tied embeddings: the head becomes E diag(γ_final) Uᵀ, which differs from the rotated embeddings E Uᵀ
unless γ_final = 1, so a rotated model stores an untied `lm_head` (one vocab × hidden matrix more).

`transform(local_name, tensor, norm)` rotates one tensor of a decoder block given the block's original
norm scales; `RotatedSource` applies it lazily to a streaming source, `rotate_model_` to a loaded model.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import InputError
from .hadamard import RandomizedHadamard, factor, random_signs

# Llama, Mistral, Qwen2, Qwen3 (the families llmq.adapters knows) share this block layout.
READERS = {
    "self_attn.q_proj": "input_layernorm",
    "self_attn.k_proj": "input_layernorm",
    "self_attn.v_proj": "input_layernorm",
    "mlp.gate_proj": "post_attention_layernorm",
    "mlp.up_proj": "post_attention_layernorm",
}
WRITERS = ("self_attn.o_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
V_PROJ, O_PROJ = "self_attn.v_proj", "self_attn.o_proj"


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class ResidualRotation:
    def __init__(self, hidden_size: int, head_dim: int | None, seed: int = 0):
        self.U = RandomizedHadamard(random_signs(hidden_size, "residual", seed))
        self.R = RandomizedHadamard(random_signs(head_dim, "head_vo", seed)) if head_dim else None

    @classmethod
    def for_config(cls, config, seed: int = 0, per_head_vo: bool = True) -> "ResidualRotation":
        for what, n in (("hidden size", config.hidden_size), ("head_dim", head_dim_of(config) if per_head_vo else 1)):
            try:
                factor(n)
            except InputError as e:
                raise InputError(f"residual rotation: {what} {n}: {e}") from None
        return cls(config.hidden_size, head_dim_of(config) if per_head_vo else None, seed)

    # one tensor at a time -------------------------------------------------------------------------
    def embedding(self, e: torch.Tensor) -> torch.Tensor:
        return self.U.forward(e.float())

    def head(self, w: torch.Tensor, final_norm: torch.Tensor) -> torch.Tensor:
        return self.U.forward(w.float() * final_norm.float())

    def _per_head_rows(self, t: torch.Tensor) -> torch.Tensor:
        """(I ⊗ R) applied to the output rows (or bias) of v_proj, head by head."""
        hd = self.R.n
        lead = t.shape[1:]
        x = t.reshape(t.shape[0] // hd, hd, -1).transpose(1, 2)  # [heads, in, hd]
        return self.R.forward(x).transpose(1, 2).reshape(t.shape[0], *lead)

    def transform(self, local: str, t: torch.Tensor, norm: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """A block tensor (name relative to the block) in the rotated model; `norm(name)` gives the block's
        original norm scale `name`.weight."""
        mod, _, leaf = local.rpartition(".")
        t = t.float()
        if mod in READERS:
            if leaf == "weight":
                t = self.U.forward(t * norm(READERS[mod]).float())
            if mod == V_PROJ and self.R is not None:
                t = self._per_head_rows(t)
            return t
        if mod in WRITERS:
            if leaf == "weight":
                t = self.U.forward(t.T).T.contiguous()
                if mod == O_PROJ and self.R is not None:
                    t = self.R.forward(t.reshape(t.shape[0], -1, self.R.n)).reshape(t.shape)
                return t
            return self.U.forward(t)  # bias
        if mod in NORMS and leaf == "weight":
            return torch.ones_like(t)
        return t


class RotatedSource:
    """A tensor source (llmq.source) seen through the residual rotation: every get() returns the rotated
    tensor, computed on demand, so the streaming pipeline still holds one block at a time. The head is
    always present (untied)."""

    def __init__(self, inner, rot: ResidualRotation, adapter):
        self.inner, self.rot, self.adapter = inner, rot, adapter
        self.embed_key = adapter.embed + ".weight"
        self.head_key = adapter.head + ".weight"
        self.norm_key = adapter.final_norm + ".weight"

    def keys(self):
        return list(self.inner.keys()) + ([self.head_key] if self.head_key not in self.inner.keys() else [])

    def __getattr__(self, name):  # dtype_on_disk, release, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def get(self, key: str) -> torch.Tensor:
        if key == self.embed_key:
            return self.rot.embedding(self.inner.get(key))
        if key == self.head_key:
            w = self.inner.get(key if key in self.inner.keys() else self.embed_key)
            return self.rot.head(w, self.inner.get(self.norm_key))
        if key == self.norm_key:
            return torch.ones_like(self.inner.get(key), dtype=torch.float32)
        blocks = self.adapter.blocks + "."
        if key.startswith(blocks):
            i, _, local = key[len(blocks):].partition(".")
            prefix = f"{blocks}{i}."
            return self.rot.transform(local, self.inner.get(key), lambda n: self.inner.get(f"{prefix}{n}.weight"))
        return self.inner.get(key)


@torch.no_grad()
def rotate_model_(model: nn.Module, rot: ResidualRotation, adapter) -> nn.Module:
    """Rotate a loaded model's residual stream in place (fp32 math, stored back in each tensor's dtype).
    The head is untied from the embeddings."""
    blocks = model.get_submodule(adapter.blocks)
    for block in blocks:
        params = dict(block.named_parameters())
        norms = {n: params[f"{n}.weight"].detach().clone() for n in NORMS}
        for name, p in params.items():
            p.data = rot.transform(name, p.detach(), lambda n: norms[n]).to(p.dtype)
    embed = model.get_submodule(adapter.embed)
    head = model.get_submodule(adapter.head)
    final_norm = model.get_submodule(adapter.final_norm)
    new_head = rot.head(head.weight.detach(), final_norm.weight.detach()).to(head.weight.dtype)
    head.weight = nn.Parameter(new_head, requires_grad=False)  # a new tensor: no longer the embeddings
    embed.weight = nn.Parameter(rot.embedding(embed.weight.detach()).to(embed.weight.dtype), requires_grad=False)
    final_norm.weight.data = torch.ones_like(final_norm.weight)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return model
