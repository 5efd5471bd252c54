"""Reading an unquantized model without loading it whole: a local Hugging Face folder (safetensors,
sharded or not), a hub id (downloaded when online), or a folder holding one GGUF file (which
transformers can only load whole; acceptable for the small GGUF models it serves)."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import InputError

SAFETENSORS_INDEX = "model.safetensors.index.json"


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def safetensors_header(path: Path) -> dict[str, dict]:
    """A safetensors file's tensor entries ({dtype, shape, data_offsets}), after checking that the header and every
    tensor's byte range agree with the file's size (a truncated or corrupt file is refused, not read as zeros)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError("header length beyond end of file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for k, v in header.items():
            start, stop = v["data_offsets"]
            if stop - start != math.prod(v["shape"]) * DTYPE_BYTES[v["dtype"]]:
                raise ValueError(f"tensor {k} has {stop - start} bytes for {v['dtype']} {v['shape']}")
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise InputError(f"corrupt safetensors file {path}: {e}") from None
    if 8 + n + end != size:
        raise InputError(f"corrupt or truncated safetensors file {path}: expected {8 + n + end} bytes, found {size}")
    return header


def check_safetensors_file(path: Path) -> list[str]:
    """Validate a safetensors file's header against its size; return its tensor names."""
    return list(safetensors_header(path))


class SafetensorsSource:
    """Tensors read on demand; each read opens and closes its file, so mapped pages never pile up."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.file_of: dict[str, Path] = {}
        index = folder / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        for name in files:
            p = folder / name
            if not p.is_file():
                raise InputError(f"safetensors shard listed in the index is missing: {p}")
            for key in check_safetensors_file(p):
                self.file_of[key] = p

    def keys(self):
        return self.file_of.keys()

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.file_of[name], framework="pt") as f:
            return f.get_tensor(name)

    def dtype_on_disk(self) -> torch.dtype:
        for k in self.file_of:
            if k.endswith(".weight"):
                return self.get(k).dtype
        return torch.float32


class StateDictSource:
    """A model already in memory (GGUF, dequantized by transformers)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        self.sd = state_dict

    def keys(self):
        return self.sd.keys()

    def get(self, name: str) -> torch.Tensor:
        return self.sd[name]

    def dtype_on_disk(self) -> torch.dtype:
        # transformers hands GGUF tensors over dequantized to fp32, but the file holds them as 4-8-bit blocks with
        # fp16 scales: fp16 keeps them to within fp16 rounding at half the bytes (the embeddings are ~20-50 % of
        # a small model's file)
        return torch.float16

    def release(self, prefix: str) -> None:
        for k in [k for k in self.sd if k.startswith(prefix)]:
            del self.sd[k]


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def resolve_model_dir(model: str) -> Path:
    p = Path(model).expanduser()
    if p.exists():
        if p.is_file() and p.suffix == ".gguf":
            return p.parent
        if not p.is_dir():
            raise InputError(f"model path is not a folder: {p}")
        return p
    if not _looks_like_hub_id(model):
        raise InputError(f"model path does not exist: {model}")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"])
        )
    except Exception as e:  # offline, unknown repo, gated ...
        raise InputError(f"model {model!r} is not a local path and could not be fetched from the hub ({type(e).__name__})") from None


def find_gguf(folder: Path) -> Path | None:
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) > 1:
        raise InputError(f"{folder} holds {len(ggufs)} .gguf files; pass the one to use as the model path")
    return ggufs[0] if ggufs else None


TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(folder: Path, gguf: Path | None = None):
    """The folder's tokenizer (else the GGUF file's); InputError, one line, when there is none usable."""
    from transformers import AutoTokenizer

    own = any((folder / n).is_file() for n in TOKENIZER_VOCAB_FILES)
    try:
        if own or gguf is None:
            return AutoTokenizer.from_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if not own and gguf is None:
            raise InputError(f"no tokenizer in {folder} (none of {', '.join(TOKENIZER_VOCAB_FILES)}); "
                             "copy the tokenizer files of the model it was made from") from None
        raise InputError(f"cannot load a tokenizer from {folder}: {' '.join(str(e).split())[:300]}") from None


class ModelSource:
    """An unquantized causal LM: its config, tokenizer folder and tensors."""

    def __init__(self, model: str):
        from transformers import AutoConfig

        self.name = model
        path = Path(model).expanduser()
        self.dir = resolve_model_dir(model)
        self.gguf = path if path.suffix == ".gguf" and path.is_file() else None
        has_st = any(self.dir.glob("*.safetensors"))
        if self.gguf is None and not has_st:
            self.gguf = find_gguf(self.dir)
        if self.gguf is None and not has_st:
            raise InputError(f"no model weights in {self.dir} (expected *.safetensors or one *.gguf)")
        try:
            if (self.dir / "config.json").is_file():
                self.config = AutoConfig.from_pretrained(self.dir)
            else:
                self.config = AutoConfig.from_pretrained(self.dir, gguf_file=self.gguf.name)
        except (OSError, ValueError, KeyError) as e:  # missing, unreadable or malformed: the user's input
            raise InputError(f"cannot read the model config in {self.dir}: {str(e).splitlines()[0][:200]}") from None
        if getattr(self.config, "quantization_config", None):
            raise InputError(f"{self.dir} is already quantized ({self.config.quantization_config.get('quant_method')}); give an unquantized model")
        self._tensors = None

    @property
    def tensors(self):
        if self._tensors is None:
            if self.gguf is not None:
                self._tensors = StateDictSource(self._load_gguf_state_dict())
            else:
                self._tensors = SafetensorsSource(self.dir)
        return self._tensors

    def _load_gguf_state_dict(self) -> dict[str, torch.Tensor]:
        from transformers import AutoModelForCausalLM

        try:
            # config given: transformers would otherwise parse the GGUF's metadata (the whole vocabulary) a second time
            m = AutoModelForCausalLM.from_pretrained(self.gguf.parent, gguf_file=self.gguf.name, config=self.config,
                                                     dtype=torch.float32)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"cannot load GGUF file {self.gguf}: {str(e).splitlines()[0][:200]}") from None
        sd = {k: v.detach() for k, v in m.state_dict().items()}
        if getattr(self.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        return sd

    def tokenizer(self):
        return load_tokenizer(self.dir, self.gguf)

    def tokenizer_files(self) -> list[Path]:
        names = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt"]
        return [self.dir / n for n in names if (self.dir / n).is_file()]
