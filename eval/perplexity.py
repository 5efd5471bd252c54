"""Perplexity with the GPTQ protocol: the evaluation text tokenized once (no BOS), cut into
non-overlapping windows of `seqlen` tokens (the tail after the last full window is dropped), each
window scored on its own (no carried context); ppl = exp(mean over windows of the mean token NLL).

    wikitext2: WikiText-2 raw test, rows joined with "\\n\\n"           (all 148 windows at 2048 for SmolLM2)
    c4:        C4 validation, first 1,100 documents joined with " ", at most 256 windows (as GPTQ)

Sliding-window variant (`stride` < seqlen): windows of `seqlen` tokens start every `stride` tokens; each
window scores only the tokens no earlier window scored (the first window scores all of its tokens after the
first), so every token but the first is scored once with at least seqlen - stride tokens of context;
ppl = exp(total NLL / tokens scored). Lower than the GPTQ number because fewer tokens see a short context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from llmq.data import C4_EVAL_DOCS, c4_validation_docs, data_dir, wikitext2_rows
from llmq.errors import InputError

PPL_TASKS = {
    "wikitext2": ("WikiText-2 raw", "test", None),
    "c4": ("C4 en", "validation[:1100 docs]", 256),
}


@dataclass
class PplResult:
    task: str
    ppl: float
    windows: int
    windows_available: int
    seqlen: int
    tokens: int  # predicted tokens scored
    dataset: str
    split: str
    dtype: str
    seconds: float
    stride: int | None = None  # None: the GPTQ protocol (non-overlapping windows)

    def protocol(self) -> str:
        if self.stride:
            return (f"{self.dataset} {self.split}, token-level, ctx {self.seqlen}, sliding stride {self.stride}, "
                    f"{self.windows}/{self.windows_available} windows, {self.tokens} tokens scored, {self.dtype}")
        return (
            f"{self.dataset} {self.split}, token-level, ctx {self.seqlen}, non-overlapping, "
            f"{self.windows}/{self.windows_available} windows, {self.tokens} tokens scored, {self.dtype}"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["protocol"] = self.protocol()
        return d


def eval_text(task: str, data: str | None) -> str:
    dd = data_dir(data)
    if task == "wikitext2":
        return "\n\n".join(wikitext2_rows(dd, "test"))
    if task == "c4":
        return " ".join(c4_validation_docs(dd)[:C4_EVAL_DOCS])
    raise InputError(f"unknown perplexity task {task!r} (choose from {', '.join(PPL_TASKS)})")


def token_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None, limit: int | None) -> tuple[torch.Tensor, int]:
    available = ids.numel() // seqlen
    if max_windows is not None:
        available = min(available, max_windows)
    n = available if limit is None else min(limit, available)
    if n < 1:
        raise InputError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen), available


@torch.no_grad()
def window_nlls(model, windows: torch.Tensor, batch_size: int = 1, on_batch=None) -> list[float]:
    """Mean next-token NLL of each window, in fp32 from the logits."""
    out = []
    for s in range(0, windows.shape[0], batch_size):
        batch = windows[s : s + batch_size].to(model.device)
        logits = model(batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        out.extend(nll.view(batch.shape[0], -1).mean(1).tolist())
        if on_batch:
            on_batch(batch.shape[0])
    return out


def strided_spans(n_tokens: int, seqlen: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, tokens to score at the end of the window) for the sliding-window protocol."""
    spans, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seqlen, n_tokens)
        spans.append((begin, end, end - max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return spans


@torch.no_grad()
def strided_nll(model, ids: torch.Tensor, spans: list[tuple[int, int, int]], batch_size: int = 1, on_batch=None) -> float:
    """Total NLL of the scored tokens; windows of equal length are batched."""
    total = 0.0
    i = 0
    while i < len(spans):
        j = i
        while j < len(spans) and j - i < batch_size and spans[j][1] - spans[j][0] == spans[i][1] - spans[i][0]:
            j += 1
        batch = torch.stack([ids[b:e] for b, e, _ in spans[i:j]]).to(model.device)
        logits = model(batch, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")  # [b, len-1]
        for k, (_, _, n) in enumerate(spans[i:j]):
            total += float(nll[k, -n:].sum())
        if on_batch:
            on_batch(j - i)
        i = j
    return total


def perplexity(model, tokenizer, task: str, seqlen: int = 2048, limit: int | None = None, batch_size: int = 1,
               data: str | None = None, on_batch=None, on_start=None, stride: int | None = None) -> PplResult:
    import time

    dataset, split, max_windows = PPL_TASKS[task] if task in PPL_TASKS else (None, None, None)
    text = eval_text(task, data)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.int64)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    if stride is not None and stride != seqlen:
        if not 0 < stride < seqlen:
            raise InputError(f"--stride must be between 1 and --seqlen ({seqlen}), got {stride}")
        if max_windows is not None:  # the same text span as the GPTQ protocol scores (C4: 256 windows)
            ids = ids[: max_windows * seqlen]
        spans = strided_spans(ids.numel(), seqlen, stride)
        available = len(spans)
        spans = spans[:limit] if limit is not None else spans
        if on_start:
            on_start(len(spans))
        t0 = time.perf_counter()
        nll = strided_nll(model, ids, spans, batch_size, on_batch)
        tokens = sum(n for _, _, n in spans)
        return PplResult(task=task, ppl=math.exp(nll / tokens), windows=len(spans), windows_available=available, seqlen=seqlen,
                         tokens=tokens, dataset=dataset, split=split, dtype=dtype, seconds=time.perf_counter() - t0, stride=stride)
    windows, available = token_windows(ids, seqlen, max_windows, limit)
    if on_start:
        on_start(windows.shape[0])
    t0 = time.perf_counter()
    nlls = window_nlls(model, windows, batch_size, on_batch)
    return PplResult(
        task=task,
        ppl=math.exp(sum(nlls) / len(nlls)),
        windows=len(nlls),
        windows_available=available,
        seqlen=seqlen,
        tokens=len(nlls) * (seqlen - 1),
        dataset=dataset,
        split=split,
        dtype=dtype,
        seconds=time.perf_counter() - t0,
    )
