"""Resume after SIGKILL gives bit-identical tensors; block-by-block streaming computes what the whole
model computes; the perplexity protocol matches a straightforward implementation."""

import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SMOLLM, make_tiny_llama, tensors_of




def quantize(model, out, kill_after=None):
    env = dict(os.environ)
    if kill_after is not None:
        env["LLMQ_DEBUG_KILL_AFTER_BLOCK"] = str(kill_after)
    args = ["quantize", model, "-o", out, "--bits", "3", "--group-size", "64", "--nsamples", "3", "--seqlen", "48", "--seed", "7"]
    return subprocess.run([sys.executable, "-m", "llmq.cli", *map(str, args)], capture_output=True, text=True, env=env)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    model = make_tiny_llama(tmp_path / "m", layers=5, seed=3)
    ref = tmp_path / "ref"
    assert quantize(model, ref).returncode == 0

    out = tmp_path / "out"
    p = quantize(model, out, kill_after=2)
    assert p.returncode == -9  # really killed
    partial = tmp_path / ".out.partial"
    assert partial.is_dir() and not out.exists()
    assert len(list(partial.glob("model-*.safetensors"))) == 3  # blocks 0..2 done

    p = quantize(model, out)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resuming" in p.stderr
    assert not partial.exists()
    a, b = tensors_of(ref), tensors_of(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert (ref / "config.json").read_text() == (out / "config.json").read_text()


def test_block_streaming_matches_full_forward(tiny_model):
    from llmq.adapters import adapter_for
    from llmq.blocks import BlockFactory, forward_block
    from llmq.source import ModelSource

    src = ModelSource(str(tiny_model))
    factory = BlockFactory(src.config, adapter_for(src.config))
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states
    h = torch.nn.functional.embedding(ids, src.tensors.get("model.embed_tokens.weight").float())
    pos = factory.position_embeddings(40)
    for i in range(factory.num_blocks):
        prefix = f"model.layers.{i}."
        state = {k[len(prefix):]: src.tensors.get(k) for k in src.tensors.keys() if k.startswith(prefix)}
        h = forward_block(factory.block(i, state), h, pos, batch_size=2)
        if i < factory.num_blocks - 1:  # the last entry of hidden_states has the final norm applied
            torch.testing.assert_close(h, want[i + 1], rtol=1e-5, atol=1e-5)


def naive_perplexity(model, ids, seqlen, n):
    nll_sum = 0.0
    for i in range(n):
        w = ids[i * seqlen : (i + 1) * seqlen]
        with torch.no_grad():
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
        nll_sum += -logp[torch.arange(seqlen - 1), w[1:]].mean().item()
    return math.exp(nll_sum / n)


def test_perplexity_protocol_matches_naive(tiny_model):
    from llmq.eval.perplexity import eval_text, perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(SMOLLM)
    r = perplexity(model, tok, "wikitext2", seqlen=128, limit=3, batch_size=2)
    text = eval_text("wikitext2", None)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids)
    assert r.windows == 3 and r.windows_available == len(ids) // 128 and r.tokens == 3 * 127
    assert r.ppl == pytest.approx(naive_perplexity(model, ids, 128, 3), rel=1e-5)
