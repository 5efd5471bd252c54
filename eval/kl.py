"""KL divergence of a model's next-token distribution Q to a reference model's P, on perplexity windows.

Per predicted token t (every position of every window but the last):

    KL_t = sum_v P_t(v) (log P_t(v) - log Q_t(v))

The reference is cached as its top-k log-probabilities (+ indices) per token, so the KL is computed on the
coarsened distributions {top-k tokens of P, "everything else"}:

    KL_t^k = sum_{v in K_t} P_t(v) log(P_t(v)/Q_t(v))  +  P_t(rest) log(P_t(rest)/Q_t(rest))

which is exact when P's tail is empty and otherwise a lower bound of KL_t (coarsening never increases a KL
divergence); the mean tail mass P(rest) is reported beside it. Also reported: the 99th percentile of KL_t,
top-1 agreement (argmax Q_t == argmax P_t), and both perplexities on the same tokens.

Cache: one safetensors file per (reference weights, dataset, context, k), under ~/.cache/llmq/kl (or
--kl-cache). It holds at least the windows asked for; a later run asking for no more windows reuses it
without loading the reference at all. Size: windows * (seqlen-1) * (8k + 4) bytes (an fp32 log-prob and an
int32 index per kept token, plus the fp32 log-prob of the true next token): 8 windows of 2048 at
k = 64 (8.1 MiB), versus 3.2 GB for the full fp32 distributions of a 49k vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llmq.errors import InputError

from .perplexity import PPL_TASKS, eval_text, token_windows

CACHE_VERSION = 1


@dataclass
class KLResult:
    task: str
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agree: float
    tail_mass_mean: float  # mean reference probability outside the cached top-k
    ppl: float
    ppl_reference: float
    windows: int
    windows_available: int
    seqlen: int
    tokens: int
    topk: int
    reference: str
    cache_file: str
    cache_bytes: int
    cache_reused: bool
    dtype: str
    seconds: float

    def protocol(self) -> str:
        ds, split, _ = PPL_TASKS[self.task]
        return (f"KL(P_ref || Q) per token on {ds} {split}, ctx {self.seqlen}, non-overlapping, {self.windows}/"
                f"{self.windows_available} windows, {self.tokens} tokens; reference top-{self.topk} + tail bucket "
                f"(lower bound; mean tail mass {self.tail_mass_mean:.4f}); cache {self.cache_bytes / 2**20:.1f} MiB "
                f"({'reused' if self.cache_reused else 'computed'}); {self.dtype}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["protocol"] = self.protocol()
        return d


def default_cache_dir() -> Path:
    base = os.environ.get("LLMQ_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llmq")
    return Path(base) / "kl"


def reference_identity(reference: str) -> dict:
    """What the cached logits depend on: the resolved folder and its weight/config files' sizes and mtimes."""
    p = Path(reference).expanduser()
    if not p.exists():
        return {"id": reference}
    p = p.resolve()
    folder = p if p.is_dir() else p.parent
    files = sorted(f for f in folder.iterdir() if f.suffix in (".safetensors", ".gguf", ".json", ".bin"))
    if p.is_file():
        files = [p] + [f for f in files if f.suffix == ".json"]
    return {"path": str(p), "files": [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files]}


def _cache_key(ref_id: dict, task: str, seqlen: int, topk: int, dtype: str) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "ref": ref_id, "task": task, "seqlen": seqlen, "topk": topk, "dtype": dtype}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _ids_digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()


@torch.no_grad()
def _window_logprobs(model, windows: torch.Tensor, batch_size: int):
    """Yield fp32 log-softmax [b, seqlen-1, vocab] for predicting tokens 1..seqlen-1 of each window."""
    device = next(model.parameters()).device
    for s in range(0, windows.shape[0], batch_size):
        batch = windows[s:s + batch_size]
        logits = model(batch.to(device), use_cache=False).logits[:, :-1].float()
        yield s, batch, torch.log_softmax(logits, dim=-1).cpu()


def build_reference_cache(model, windows: torch.Tensor, topk: int, path: Path, meta: dict, batch_size: int = 1,
                          on_batch=None) -> None:
    n, L = windows.shape[0], windows.shape[1] - 1
    vals = torch.empty(n, L, topk, dtype=torch.float32)
    idx = torch.empty(n, L, topk, dtype=torch.int32)
    target_lp = torch.empty(n, L, dtype=torch.float32)
    for s, batch, lp in _window_logprobs(model, windows, batch_size):
        v, i = lp.topk(topk, dim=-1)  # sorted: index 0 is the reference's argmax
        vals[s:s + len(batch)], idx[s:s + len(batch)] = v, i.to(torch.int32)
        target_lp[s:s + len(batch)] = lp.gather(-1, batch[:, 1:, None]).squeeze(-1)
        if on_batch:
            on_batch(len(batch))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"topk_logprob": vals, "topk_index": idx, "target_logprob": target_lp}, str(tmp),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache behind


def read_reference_cache(path: Path) -> tuple[dict, dict] | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001  (a corrupt cache is recomputed, not trusted)
        return None
    return meta, tensors


def kl_from_cache(model, windows: torch.Tensor, tensors: dict, batch_size: int = 1, on_batch=None) -> dict:
    n = windows.shape[0]
    kls, agree, tails, nll_q = [], 0, [], 0.0
    ref_vals, ref_idx = tensors["topk_logprob"][:n], tensors["topk_index"][:n].long()
    for s, batch, lq in _window_logprobs(model, windows, batch_size):
        lp_k = ref_vals[s:s + len(batch)]  # [b, L, k]
        lq_k = lq.gather(-1, ref_idx[s:s + len(batch)])
        p_k = lp_k.exp()
        p_rest = (1 - p_k.sum(-1)).clamp_min(0)
        q_rest = (1 - lq_k.exp().sum(-1)).clamp_min(0)
        kl = (p_k * (lp_k - lq_k)).sum(-1)
        # tail bucket; 0 * log(0/.) = 0, and q_rest is floored so a fully captured Q cannot divide by zero
        kl = kl + torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-30).log() - q_rest.clamp_min(1e-30).log()), torch.zeros_like(p_rest))
        kls.append(kl.clamp_min(0).flatten())  # rounding can leave -1e-9 for identical models
        tails.append(p_rest.flatten())
        agree += int((lq.argmax(-1) == ref_idx[s:s + len(batch), :, 0]).sum())
        nll_q -= float(lq.gather(-1, batch[:, 1:, None]).double().sum())
        if on_batch:
            on_batch(len(batch))
    kl = torch.cat(kls).double()
    tokens = kl.numel()
    ref_nll = -float(tensors["target_logprob"][:n].double().sum())
    return {
        "kl_mean": float(kl.mean()), "kl_median": float(kl.median()), "kl_p99": float(torch.quantile(kl, 0.99)),
        "kl_max": float(kl.max()), "top1_agree": agree / tokens, "tail_mass_mean": float(torch.cat(tails).double().mean()),
        "ppl": math.exp(nll_q / tokens), "ppl_reference": math.exp(ref_nll / tokens), "tokens": tokens,
    }


def kl_divergence(model, tok, reference: str, task: str = "wikitext2", seqlen: int = 2048, limit: int | None = None,
                  topk: int = 64, batch_size: int = 1, data: str | None = None, cache_dir: Path | None = None,
                  load_reference=None, dtype=torch.float32, on_start=None, on_batch=None, log=None) -> KLResult:
    """KL of `model` to `reference` on the windows of `task`. `load_reference(reference, dtype)` -> (model, tok)
    is called only when the cache lacks these windows."""
    if task not in PPL_TASKS:
        raise InputError(f"KL needs a text dataset: one of {', '.join(PPL_TASKS)}, got {task!r}")
    if topk < 1:
        raise InputError("--kl-topk must be at least 1")
    t0 = time.perf_counter()
    dtype_name = str(dtype).replace("torch.", "")
    ids = torch.tensor(tok(eval_text(task, data), add_special_tokens=False).input_ids, dtype=torch.int64)
    windows, available = token_windows(ids, seqlen, PPL_TASKS[task][2], limit)
    ref_id = reference_identity(reference)
    path = (cache_dir or default_cache_dir()) / f"{task}-ctx{seqlen}-top{topk}-{_cache_key(ref_id, task, seqlen, topk, dtype_name)}.safetensors"
    cached = read_reference_cache(path)
    digest = _ids_digest(windows)
    reused = False
    if cached is not None and cached[0].get("windows", 0) >= windows.shape[0]:
        meta, tensors = cached
        if meta.get("ids_digest", {}).get(str(windows.shape[0])) != digest:
            raise InputError(f"the model's tokenizer gives different tokens from the reference's on {task}: KL needs the same vocabulary and tokenizer")
        reused = True
    else:
        if load_reference is None:
            from llmq.loading import load_causal_lm

            def load_reference(r, dt):
                m, t, _ = load_causal_lm(r, dt)
                return m, t
        if log:
            log(f"computing reference log-probs of {reference} (top-{topk}), cached at {path}")
        ref_model, ref_tok = load_reference(reference, dtype)
        ref_ids = torch.tensor(ref_tok(eval_text(task, data), add_special_tokens=False).input_ids, dtype=torch.int64)
        ref_windows, _ = token_windows(ref_ids, seqlen, PPL_TASKS[task][2], limit)
        if not torch.equal(ref_windows, windows):
            raise InputError(f"the model's tokenizer gives different tokens from the reference's on {task}: KL needs the same vocabulary and tokenizer")
        vocab = ref_model.get_output_embeddings().weight.shape[0]
        if topk > vocab:
            raise InputError(f"--kl-topk {topk} exceeds the vocabulary ({vocab})")
        # digests of every prefix length, so a later run with a smaller --limit can check its windows too
        digests = {str(k): _ids_digest(windows[:k]) for k in range(1, windows.shape[0] + 1)}
        meta = {"version": CACHE_VERSION, "reference": ref_id, "task": task, "seqlen": seqlen, "topk": topk, "dtype": dtype_name,
                "windows": windows.shape[0], "ids_digest": digests}
        if on_start:
            on_start(windows.shape[0], "reference")
        build_reference_cache(ref_model, windows, topk, path, meta, batch_size, on_batch)
        del ref_model
        meta, tensors = read_reference_cache(path)
    if on_start:
        on_start(windows.shape[0], "kl")
    stats = kl_from_cache(model, windows, tensors, batch_size, on_batch)
    return KLResult(
        task=task, windows=windows.shape[0], windows_available=available, seqlen=seqlen, topk=topk, reference=reference,
        cache_file=str(path), cache_bytes=path.stat().st_size, cache_reused=reused, dtype=dtype_name,
        seconds=time.perf_counter() - t0, **{k: v for k, v in stats.items()},
    )
