"""Loading any model llmq can evaluate: an llmq checkpoint, a plain Hugging Face folder or hub id, or a
folder holding one GGUF file."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import llmq_config, validate_checkpoint
from .errors import InputError
from .source import find_gguf, load_tokenizer, resolve_model_dir


def is_llmq_checkpoint(folder: Path) -> bool:
    return llmq_config(folder) is not None


def load_causal_lm(model: str, dtype: torch.dtype = torch.float32, seqlen: int | None = None):
    """(model, tokenizer, description). llmq checkpoints load through the registered quantizer. `seqlen`:
    windows to be scored, refused before the weights are read when beyond the model's context."""
    import llmq  # noqa: F401  (registers the quantizer before from_pretrained)
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = resolve_model_dir(model)
    llmq_ckpt = is_llmq_checkpoint(folder)
    if llmq_ckpt:  # before transformers reads it: one line naming what is damaged, not NaN logits or a traceback
        validate_checkpoint(folder)
    path = Path(model)
    gguf = path if path.suffix == ".gguf" else (None if any(folder.glob("*.safetensors")) else find_gguf(folder))
    kwargs = {"dtype": dtype}
    if gguf is not None:
        kwargs["gguf_file"] = gguf.name
    elif not any(folder.glob("*.safetensors")):
        raise InputError(f"no model weights in {folder} (expected *.safetensors or one *.gguf)")
    tok = load_tokenizer(folder, gguf)  # first: a missing tokenizer is found before the weights are read
    if seqlen is not None:
        try:
            max_ctx = getattr(AutoConfig.from_pretrained(folder, **({"gguf_file": gguf.name} if gguf else {})), "max_position_embeddings", None)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"cannot read the model config of {model}: {str(e).splitlines()[0][:200]}") from None
        if max_ctx and seqlen > max_ctx:
            raise InputError(f"--seqlen {seqlen} is beyond the context of {model} ({max_ctx} tokens)")
    try:
        m = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load {model} as a causal LM: {str(e).splitlines()[0][:200]}") from None
    kind = "llmq" if llmq_ckpt else ("gguf" if gguf else "hf")
    return m.eval(), tok, kind
