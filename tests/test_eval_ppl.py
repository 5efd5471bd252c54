"""Perplexity against an independent, straightforward implementation (own file reading, own loop, explicit
log-softmax), at context 2048 as in the GPTQ protocol, and the sliding-window variant."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import DATA, make_tiny_llama
from llmq.eval.perplexity import perplexity, strided_spans


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = make_tiny_llama(tmp_path_factory.mktemp("ppl") / "m", layers=1, hidden=64, inter=96, seed=3)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def reference_ids(tok) -> torch.Tensor:
    # HF wikitext-2-raw-v1 test rows, written out independently of llmq.data
    with open(DATA / "wikitext-2-raw/wiki.test.raw", encoding="utf-8", newline="") as f:
        text = "\n\n".join(line if line.strip() else "" for line in f)
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def test_gptq_protocol_matches_straightforward_loop(small):
    model, tok = small
    seqlen, n = 2048, 2
    ids = reference_ids(tok)
    assert ids.numel() // seqlen == 148  # the full test set has 148 windows at 2048 with this tokenizer
    nlls = []
    for i in range(n):
        w = ids[i * seqlen:(i + 1) * seqlen][None]
        logp = torch.log_softmax(model(w).logits[0, :-1].double(), -1)
        nlls.append(-logp[torch.arange(seqlen - 1), w[0, 1:]].mean().item())
    expected = math.exp(sum(nlls) / n)
    r = perplexity(model, tok, "wikitext2", seqlen=seqlen, limit=n, batch_size=2, data=str(DATA))
    assert r.windows == n and r.windows_available == 148 and r.tokens == n * (seqlen - 1)
    assert r.ppl == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_sliding_window_matches_straightforward_loop(small):
    model, tok = small
    seqlen, stride, n = 256, 128, 5
    ids = reference_ids(tok)
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, stride * n, stride):  # the usual strided loop, first n windows
        end = begin + seqlen
        w = ids[begin:end][None]
        logp = torch.log_softmax(model(w).logits[0, :-1].double(), -1)
        tok_nll = -logp[torch.arange(seqlen - 1), w[0, 1:]]
        new = end - max(prev_end, begin + 1)
        nll += tok_nll[-new:].sum().item()
        count += new
        prev_end = end
    r = perplexity(model, tok, "wikitext2", seqlen=seqlen, stride=stride, limit=n, batch_size=3, data=str(DATA))
    assert r.tokens == count == (seqlen - 1) + (n - 1) * stride and r.stride == stride
    assert r.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert "sliding stride 128" in r.protocol()


def test_strided_spans_score_every_token_once():
    for n_tokens, seqlen, stride in [(1000, 256, 128), (1000, 256, 100), (257, 256, 200), (5000, 512, 511)]:
        spans = strided_spans(n_tokens, seqlen, stride)
        scored = []
        for b, e, k in spans:
            assert 0 < k <= e - b - 0 and e - b <= seqlen
            scored.extend(range(e - k, e))
        assert scored == list(range(1, n_tokens))
