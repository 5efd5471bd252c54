"""KL divergence to a reference: 0 against itself, positive for an RTN 3-bit checkpoint, exact when the
cache keeps the whole vocabulary and a lower bound otherwise, and the cached reference reused."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from conftest import DATA
from llmq.cli import app
from llmq.eval.kl import kl_divergence
from llmq.eval.perplexity import eval_text, token_windows
from llmq.loading import load_causal_lm


@pytest.fixture(scope="module")
def rtn3(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("kl") / "rtn3"
    r = CliRunner().invoke(app, ["quantize", str(tiny_model), "-o", str(out), "--calib", "none", "--bits", "3", "--group-size", "32", "--asym"])
    assert r.exit_code == 0, r.output
    return out


def _loader(calls):
    def load(path, dtype):
        calls.append(path)
        m, t, _ = load_causal_lm(path, dtype)
        return m, t
    return load


def test_self_zero_rtn3_positive_and_cache_reused(tiny_model, rtn3, tmp_path):
    calls = []
    fp, tok, _ = load_causal_lm(str(tiny_model))
    kw = dict(task="wikitext2", seqlen=64, limit=3, topk=32, data=str(DATA), cache_dir=tmp_path, load_reference=_loader(calls))
    same = kl_divergence(fp, tok, str(tiny_model), **kw)
    assert calls == [str(tiny_model)] and not same.cache_reused
    assert same.kl_mean == 0 and same.kl_p99 == 0 and same.top1_agree == 1
    assert same.ppl == pytest.approx(same.ppl_reference, rel=1e-6)
    assert same.tokens == 3 * 63 and same.cache_bytes > 3 * 63 * 32 * 8

    q, qtok, kind = load_causal_lm(str(rtn3))
    assert kind == "llmq"
    r = kl_divergence(q, qtok, str(tiny_model), **kw)
    assert calls == [str(tiny_model)], "the cached reference must not be recomputed"
    assert r.cache_reused and r.cache_file == same.cache_file
    assert r.kl_mean > 1e-3 and r.kl_p99 >= r.kl_median and r.top1_agree < 1
    assert r.ppl_reference == pytest.approx(same.ppl_reference, rel=1e-9)

    # fewer windows reuse the same cache; more windows recompute it
    fewer = kl_divergence(q, qtok, str(tiny_model), **{**kw, "limit": 2})
    assert fewer.cache_reused and fewer.windows == 2 and len(calls) == 1
    more = kl_divergence(q, qtok, str(tiny_model), **{**kw, "limit": 4})
    assert not more.cache_reused and len(calls) == 2


@torch.no_grad()
def test_topk_kl_is_exact_with_full_vocab_and_a_lower_bound_otherwise(tiny_model, rtn3, tmp_path):
    fp = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    q, _, _ = load_causal_lm(str(rtn3))
    ids = torch.tensor(tok(eval_text("wikitext2", str(DATA)), add_special_tokens=False).input_ids)
    windows, _ = token_windows(ids, 16, None, 2)
    lp = torch.log_softmax(fp(windows).logits[:, :-1].double(), -1)
    lq = torch.log_softmax(q(windows).logits[:, :-1].double(), -1)
    exact = (lp.exp() * (lp - lq)).sum(-1).flatten()
    vocab = lp.shape[-1]
    full = kl_divergence(q, tok, str(tiny_model), seqlen=16, limit=2, topk=vocab, data=str(DATA), cache_dir=tmp_path)
    assert full.kl_mean == pytest.approx(exact.mean().item(), rel=1e-3)
    assert full.kl_p99 == pytest.approx(torch.quantile(exact, 0.99).item(), rel=1e-3)
    assert full.top1_agree == pytest.approx((lp.argmax(-1) == lq.argmax(-1)).double().mean().item())
    assert full.tail_mass_mean < 1e-5
    small = kl_divergence(q, tok, str(tiny_model), seqlen=16, limit=2, topk=8, data=str(DATA), cache_dir=tmp_path)
    assert 0 < small.kl_mean <= full.kl_mean + 1e-9 and small.tail_mass_mean > 0


def test_cli_kl_json_keys_and_missing_reference(tiny_model, rtn3, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["eval", str(rtn3), "--tasks", "kl", "--seqlen", "32"])
    assert r.exit_code == 2 and "--reference" in r.output
    js = tmp_path / "kl.json"
    r = runner.invoke(app, ["eval", str(rtn3), "--tasks", "kl", "--reference", str(tiny_model), "--seqlen", "32", "--limit", "2",
                            "--kl-topk", "16", "--kl-cache", str(tmp_path / "cache"), "--json", str(js)])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())[str(rtn3)]["kl"]
    assert {"kl_mean", "kl_p99", "top1_agree", "protocol", "cache_bytes"} <= set(res) and res["kl_mean"] > 0
    assert "top-16" in r.output and "KL mean" in r.output
