"""Calibration samples: `nsamples` windows of `seqlen` tokens, drawn at seeded random offsets from one
token stream (the documents joined with blank lines and tokenized once). Deterministic per seed.

Sources: `c4` (C4 validation documents 1,100-1,999 locally, disjoint from the C4 evaluation slice; C4
train shard 0 from the hub), `wikitext2` (train split; locally the tokenized validation split when the
raw train file is absent; never the test split), a local .txt/.jsonl/.parquet file, `hf:NAME[:CONFIG[:SPLIT]]`
for any `datasets` dataset with a 'text' column, or `none`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .data import C4_EVAL_DOCS, _hub, c4_validation_docs, data_dir, read_text_file, wikitext2_rows
from .errors import InputError


@dataclass
class CalibConfig:
    source: str = "c4"
    nsamples: int = 128
    seqlen: int | None = 2048  # None: DEFAULT_SEQLEN, or the model's context if shorter (resolved by the pipeline)
    seed: int = 0
    data_dir: str | None = None
    dtype: str = "auto"  # of the calibration forward passes (activations); Hessians are always fp32

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("data_dir")
        return d

    def torch_dtype(self) -> torch.dtype:
        return resolve_calib_dtype(self.dtype)

    def resolved(self) -> "CalibConfig":
        """This config with `auto` replaced by the dtype it means on this machine."""
        t = self.torch_dtype()
        return replace(self, dtype=next(k for k, v in CALIB_DTYPES.items() if v == t))


DEFAULT_SEQLEN = 2048
CALIB_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


CALIB_BATCH_TOKENS = 4096  # default tokens per calibration forward pass


def calib_batch_size(batch_size: int | None, seqlen: int) -> int:
    """Sequences per calibration forward pass: as given, else as many as fill CALIB_BATCH_TOKENS (at least
    one). Larger matmuls and fewer paused samples in a staged pass: measured 1.3x faster per SmolLM2 block
    (32 x 512 tokens, bf16, 2 cores: 8 sequences per pass vs 1). Results do not depend on it beyond rounding."""
    from .errors import InputError

    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {batch_size}")
    return batch_size if batch_size is not None else max(1, CALIB_BATCH_TOKENS // max(1, seqlen))


def resolve_calib_dtype(name: str) -> torch.dtype:
    """The dtype the calibration samples run through the blocks in. `auto`: bf16 where the CPU multiplies
    bf16 natively (AVX512-BF16 / AMX: 2-3x the fp32 matmul rate), else fp32. The GPTQ reference code runs
    its calibration forward in fp16 and accumulates H in fp32 from those inputs; llmq does the same with
    bf16 on CPU. The weights being quantized, H, and the quantization math stay fp32 either way."""
    if name == "auto":
        return torch.bfloat16 if native_bf16() else torch.float32
    if name not in CALIB_DTYPES:
        raise InputError(f"--calib-dtype must be auto, fp32, bf16 or fp16, got {name!r}")
    return CALIB_DTYPES[name]


def native_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch
        return False


def calibration_texts(cfg: CalibConfig) -> list[str]:
    src = cfg.source
    dd = data_dir(cfg.data_dir)
    if src == "c4":
        if dd is None:
            return list(_hub("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")["text"][:5000])
        return c4_validation_docs(dd)[C4_EVAL_DOCS:]
    if src == "wikitext2":
        if dd is None:
            return wikitext2_rows(None, "train")
        for rel in ("wikitext-2-raw/wiki.train.raw", "wikitext-2-raw/wiki.valid.raw", "wikitext-2-tokenized/valid.txt"):
            if (dd / rel).is_file():
                return read_text_file(dd / rel)
        raise InputError(f"no WikiText-2 train or validation text in {dd}")
    if src.startswith("hf:"):
        name, config, split = (src[3:].split(":") + [None, None])[:3]
        ds = _hub(name, config, split=split or "train")
        if "text" not in ds.column_names:
            raise InputError(f"dataset {name!r} has no 'text' column")
        return [t for t in ds["text"] if t]
    p = Path(src).expanduser()
    if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "state.json").is_file()):
        import datasets

        return [t for t in datasets.load_from_disk(str(p))["text"] if t]
    if p.is_file():
        return read_text_file(p)
    raise InputError(f"unknown calibration source {src!r}: use c4, wikitext2, none, hf:NAME, or a local file")


def tokenize_stream(texts: list[str], tokenizer, docs_per_chunk: int = 64) -> torch.Tensor:
    """Token ids of "\n\n".join(texts), tokenized a chunk of documents at a time to bound memory (chunks
    after the first keep their leading "\n\n", so only tokens spanning a chunk boundary can differ)."""
    parts = []
    for s in range(0, len(texts), docs_per_chunk):
        chunk = ("\n\n" if s else "") + "\n\n".join(texts[s : s + docs_per_chunk])
        parts.append(torch.tensor(tokenizer(chunk, add_special_tokens=False).input_ids, dtype=torch.int64))
    return torch.cat(parts)


def calibration_ids(cfg: CalibConfig, tokenizer) -> torch.Tensor | None:
    """[nsamples, seqlen] token ids, or None for `--calib none`."""
    if cfg.source == "none":
        return None
    if cfg.nsamples < 1 or cfg.seqlen < 2:
        raise InputError(f"calibration needs nsamples >= 1 and seqlen >= 2 (got {cfg.nsamples}, {cfg.seqlen})")
    texts = [t for t in calibration_texts(cfg) if t and t.strip()]
    if not texts:
        raise InputError(f"calibration set {cfg.source!r} is empty")
    ids = tokenize_stream(texts, tokenizer)
    if ids.numel() < cfg.seqlen + 1:
        raise InputError(f"calibration set {cfg.source!r} has {ids.numel()} tokens, fewer than one window of {cfg.seqlen}")
    g = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, ids.numel() - cfg.seqlen, (cfg.nsamples,), generator=g)
    return torch.stack([ids[s : s + cfg.seqlen] for s in starts.tolist()])
