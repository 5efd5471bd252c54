"""Per-family adapters: where a decoder-only model keeps its blocks, their linear layers (in execution
order, grouped by shared input), embeddings, final norm and head. Llama, Mistral, Qwen2 and Qwen3 share
one layout; a new family with other names adds one entry here."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class DecoderAdapter:
    family: str
    blocks: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    # Linear layers of one block in execution order; layers in one tuple read the same input.
    linear_groups: tuple[tuple[str, ...], ...] = (
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    )

    @property
    def linears(self) -> list[str]:
        return [n for group in self.linear_groups for n in group]

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks}.{i}."


LLAMA_STYLE = DecoderAdapter("llama")
ADAPTERS = {
    "llama": LLAMA_STYLE,
    "mistral": DecoderAdapter("mistral"),
    "qwen2": DecoderAdapter("qwen2"),
    "qwen3": DecoderAdapter("qwen3"),
}


def adapter_for(config) -> DecoderAdapter:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or []
    causal_archs = [a for a in archs if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or (archs and not causal_archs):
        raise InputError(f"not a causal language model: {', '.join(archs) or model_type} (model_type {model_type!r})")
    if model_type not in ADAPTERS:
        raise InputError(f"unsupported architecture {model_type!r}; llmq supports {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[model_type]
