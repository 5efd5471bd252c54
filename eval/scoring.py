"""Log-likelihood of continuations given contexts, with lm-evaluation-harness semantics and shared contexts
scored once.

Semantics (as lm-eval's HFLM `loglikelihood`): trailing whitespace of the context moves to the continuation;
`whole = enc(context + continuation)`, `ctx = enc(context)`, `cont = whole[len(ctx):]`; the model reads
`ctx + cont[:-1]` and the request's score is  sum_j log p(cont_j | ctx, cont_<j)  (natural log), plus
`is_greedy` = every continuation token is the argmax. An empty context is replaced by the BOS token (EOS when
there is none). Tokenization uses the tokenizer's defaults (BOS only if the tokenizer adds one).

Efficiency: requests are grouped by context. A group becomes one packed row

    [ctx_0 .. ctx_{c-1} | a_0 .. a_{la-2} | b_0 .. b_{lb-2} | ...]

in which every continuation block restarts its position ids at c and attends (4-D mask) only to the context
and to its own earlier tokens. Each continuation is then computed exactly as in its own sequence (the same
math, different float summation order), but the context is read once for all choices. Rows are sorted by
length and batched under a token budget; logits are projected only at the positions that are scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmq.errors import InputError


@dataclass
class Score:
    logprob: float  # sum of the continuation tokens' log-probabilities
    is_greedy: bool
    ntokens: int


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return [prefix], tok(continuation).input_ids
    whole = tok(context + continuation).input_ids
    ctx = tok(context).input_ids
    return ctx, whole[len(ctx):]


@dataclass
class _Row:
    ctx: list[int]
    conts: list[tuple[int, list[int]]]  # (request index, continuation tokens)

    def __len__(self) -> int:
        return len(self.ctx) + sum(len(c) - 1 for _, c in self.conts)


def _build_rows(encoded: list[tuple[list[int], list[int]]], max_length: int) -> list[_Row]:
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for i, (ctx, cont) in enumerate(encoded):
        if not cont:
            raise InputError("a continuation encodes to zero tokens; nothing to score")
        if len(cont) > max_length:
            raise InputError(f"a continuation of {len(cont)} tokens exceeds the model's {max_length}-token context")
        if len(ctx) + len(cont) > max_length + 1:  # as lm-eval: keep the last tokens of the context
            ctx = ctx[-(max_length + 1 - len(cont)):]
        groups.setdefault(tuple(ctx), []).append((i, cont))
    rows = []
    for ctx, conts in groups.items():
        ctx = list(ctx)
        row = _Row(ctx, [])
        for ic in conts:  # a row never exceeds max_length + the context (split wide groups over rows)
            if row.conts and len(row) + len(ic[1]) - 1 > max(max_length, 2 * len(ctx)):
                rows.append(row)
                row = _Row(ctx, [])
            row.conts.append(ic)
        rows.append(row)
    return rows


def _pack(rows: list[_Row], dtype: torch.dtype):
    """input ids, position ids, additive 4-D mask, and per row the (positions, targets, request) triples."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    allow = torch.zeros(len(rows), width, width, dtype=torch.bool)
    keep = torch.zeros(len(rows), width, dtype=torch.bool)
    plan = []
    for b, r in enumerate(rows):
        c = len(r.ctx)
        ids[b, :c] = torch.tensor(r.ctx)
        pos[b, :c] = torch.arange(c)
        allow[b, :c, :c] = torch.ones(c, c, dtype=torch.bool).tril()
        keep[b, c - 1] = True
        at = c
        items = []
        for req, cont in r.conts:
            n = len(cont) - 1  # tokens this continuation adds to the row
            if n:
                ids[b, at:at + n] = torch.tensor(cont[:-1])
                pos[b, at:at + n] = torch.arange(c, c + n)
                allow[b, at:at + n, :c] = True
                allow[b, at:at + n, at:at + n] = torch.ones(n, n, dtype=torch.bool).tril()
                keep[b, at:at + n] = True
            items.append(([c - 1] + list(range(at, at + n)), cont, req))
            at += n
        for p in range(at, width):  # padding attends to itself only (no fully masked rows, no NaN)
            allow[b, p, p] = True
        plan.append(items)
    mask = torch.zeros(allow.shape, dtype=dtype).masked_fill_(~allow, torch.finfo(dtype).min)[:, None]
    return ids, pos, mask, keep, plan


def model_max_length(model, default: int = 2048) -> int:
    n = getattr(model.config, "max_position_embeddings", None)
    return int(n) if n else default


@torch.no_grad()
def score_requests(model, tok, requests: list[tuple[str, str]], batch_tokens: int = 4096, max_length: int | None = None,
                   on_progress=None) -> list[Score]:
    """Score (context, continuation) pairs; `on_progress(k)` is called with the number of requests finished."""
    max_length = max_length or model_max_length(model)
    encoded = [encode_pair(tok, c, x) for c, x in requests]
    rows = sorted(_build_rows(encoded, max_length), key=len, reverse=True)
    results: list[Score | None] = [None] * len(requests)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    i = 0
    while i < len(rows):
        # rows are sorted longest first, so the first row fixes the padded width of the batch
        n = max(1, min(len(rows) - i, batch_tokens // max(1, len(rows[i]))))
        batch = rows[i:i + n]
        ids, pos, mask, keep, plan = _pack(batch, dtype)
        logits = model(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=mask.to(device),
                       logits_to_keep=keep.to(device), use_cache=False).logits
        logp = torch.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
        # kept positions come out flattened in row-major order: map (row, position) -> output index
        index = torch.full(keep.shape, -1, dtype=torch.long)
        index[keep] = torch.arange(int(keep.sum()))
        done = 0
        for b, items in enumerate(plan):
            for positions, cont, req in items:
                lp = logp[index[b, positions]]
                target = torch.tensor(cont, device=lp.device)
                tok_lp = lp.gather(1, target[:, None]).squeeze(1)
                results[req] = Score(float(tok_lp.sum()), bool((lp.argmax(-1) == target).all()), len(cont))
                done += 1
        if on_progress:
            on_progress(done)
        i += n
    return results  # type: ignore[return-value]


@torch.no_grad()
def score_requests_naive(model, tok, requests: list[tuple[str, str]], max_length: int | None = None) -> list[Score]:
    """One plain forward pass per request (the reference the packed scorer is tested against)."""
    max_length = max_length or model_max_length(model)
    out = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tok, context, continuation)
        inp = torch.tensor((ctx + cont)[-(max_length + 1):][:-1])[None]
        logp = torch.log_softmax(model(inp, use_cache=False).logits.float()[0, -len(cont):], -1)
        target = torch.tensor(cont)
        out.append(Score(float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all()), len(cont)))
    return out
