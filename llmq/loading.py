"""Loading any model llmq can evaluate: an llmq checkpoint, a plain Hugging Face folder or hub id, or a
folder holding one GGUF file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import InputError
from .source import find_gguf, resolve_model_dir


def is_llmq_checkpoint(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "llmq"


def load_causal_lm(model: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, description). llmq checkpoints load through the registered quantizer."""
    import llmq  # noqa: F401  (registers the quantizer before from_pretrained)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(model)
    path = Path(model)
    gguf = path if path.suffix == ".gguf" else (None if any(folder.glob("*.safetensors")) else find_gguf(folder))
    kwargs = {"dtype": dtype}
    if gguf is not None:
        kwargs["gguf_file"] = gguf.name
    elif not any(folder.glob("*.safetensors")):
        raise InputError(f"no model weights in {folder} (expected *.safetensors or one *.gguf)")
    try:
        m = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load {model} as a causal LM: {str(e).splitlines()[0][:200]}") from None
    tok_kwargs = {} if (folder / "tokenizer.json").is_file() or gguf is None else {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(folder, **tok_kwargs)
    kind = "llmq" if is_llmq_checkpoint(folder) else ("gguf" if gguf else "hf")
    return m.eval(), tok, kind
