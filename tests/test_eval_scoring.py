"""Packed zero-shot scoring (shared contexts, 4-D masks, batching) equals one plain forward pass per request,
and lm-eval's tokenization rules for (context, continuation) pairs."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmq.eval.scoring import encode_pair, score_requests, score_requests_naive

REQS = [
    ("Question: How do I boil water?\nAnswer:", " Put it in a pot and heat it on the stove until it bubbles."),
    ("Question: How do I boil water?\nAnswer:", " Freeze it."),
    ("Question: How do I boil water?\nAnswer:", " Ask."),
    ("The cat sat on the ", "mat"),  # trailing space moves to the continuation
    ("", "Hello world"),  # empty context: scored after BOS
    ("Passage: the sky is blue\nQuestion: is the sky blue?\nAnswer:", " yes"),
    ("Passage: the sky is blue\nQuestion: is the sky blue?\nAnswer:", " no"),
    ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
    ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ("A long context " + "word " * 60, " end of it"),
]


@pytest.fixture(scope="module")
def lm(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("batch_tokens", [1, 64, 100000])
def test_packed_scores_equal_independent_passes(lm, batch_tokens):
    model, tok = lm
    packed = score_requests(model, tok, REQS, batch_tokens=batch_tokens)
    naive = score_requests_naive(model, tok, REQS)
    for p, n in zip(packed, naive):
        assert p.ntokens == n.ntokens
        assert p.logprob == pytest.approx(n.logprob, abs=2e-4, rel=1e-5)
        assert p.is_greedy == n.is_greedy


def test_truncation_keeps_the_end_of_the_context(lm):
    model, tok = lm
    reqs = REQS[-1:] + REQS[:2]
    packed = score_requests(model, tok, reqs, max_length=24)
    naive = score_requests_naive(model, tok, reqs, max_length=24)
    for p, n in zip(packed, naive):
        assert p.logprob == pytest.approx(n.logprob, abs=2e-4, rel=1e-5)
    # truncation really changed the long request's score
    assert abs(packed[0].logprob - score_requests(model, tok, reqs[:1])[0].logprob) > 1e-3


def test_greedy_continuation_is_flagged(lm):
    model, tok = lm
    ctx = tok("The quantized model").input_ids
    with torch.no_grad():
        ids = torch.tensor([ctx])
        for _ in range(3):  # greedy tokens, re-encoded as text and checked to round-trip
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    cont = tok.decode(ids[0, len(ctx):])
    c_enc, x_enc = encode_pair(tok, "The quantized model", cont)
    if c_enc + x_enc != ids[0].tolist():
        pytest.skip("greedy tokens do not round-trip through text for this random model")
    assert score_requests(model, tok, [("The quantized model", cont)])[0].is_greedy


def test_encode_pair_follows_lm_eval(lm):
    _, tok = lm
    ctx, cont = encode_pair(tok, "The cat sat on the ", "mat")
    assert ctx == tok("The cat sat on the").input_ids
    assert ctx + cont == tok("The cat sat on the mat").input_ids
    ctx, cont = encode_pair(tok, "", "Hello")
    assert ctx == [tok.bos_token_id] and cont == tok("Hello").input_ids
