"""Calibration sources and determinism; eval JSON contract; inspect; a second family (Qwen2, with biases)."""

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from conftest import DATA, SMOLLM, TOKENIZER_FILES
from llmq.calib import CalibConfig, calibration_ids, calibration_texts
from llmq.cli import app
from llmq.data import c4_validation_docs
from llmq.modules import LlmqLinear


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(SMOLLM)


def test_calibration_is_deterministic_per_seed(tok):
    a = calibration_ids(CalibConfig("c4", nsamples=5, seqlen=32, seed=1, data_dir=str(DATA)), tok)
    b = calibration_ids(CalibConfig("c4", nsamples=5, seqlen=32, seed=1, data_dir=str(DATA)), tok)
    c = calibration_ids(CalibConfig("c4", nsamples=5, seqlen=32, seed=2, data_dir=str(DATA)), tok)
    assert a.shape == (5, 32) and torch.equal(a, b) and not torch.equal(a, c)


def test_c4_calibration_is_disjoint_from_c4_eval():
    docs = c4_validation_docs(DATA)
    calib = calibration_texts(CalibConfig("c4", data_dir=str(DATA)))
    assert calib == docs[1100:] and not set(calib) & set(docs[:1100])


def test_wikitext2_calibration_never_uses_test(tok):
    texts = calibration_texts(CalibConfig("wikitext2", data_dir=str(DATA)))
    test_text = (DATA / "wikitext-2-raw/wiki.test.raw").read_text()
    assert texts and texts[0][:2000] not in test_text
    assert calibration_ids(CalibConfig("wikitext2", nsamples=2, seqlen=64, data_dir=str(DATA)), tok).shape == (2, 64)


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_file_sources(tmp_path, tok, kind):
    docs = [f"Document number {i} talks about quantization of language models." * 5 for i in range(20)]
    p = tmp_path / f"calib.{kind}"
    if kind == "txt":
        p.write_text("\n\n".join(docs))
    elif kind == "jsonl":
        p.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    else:
        pq.write_table(pa.table({"text": docs}), p)
    ids = calibration_ids(CalibConfig(str(p), nsamples=3, seqlen=40), tok)
    assert ids.shape == (3, 40)


def test_eval_json_contract_and_inspect(tiny_model, tmp_path):
    runner = CliRunner()
    out = tmp_path / "q"
    assert runner.invoke(app, ["quantize", str(tiny_model), "-o", str(out), "--calib", "none", "--group-size", "64"]).exit_code == 0
    js = tmp_path / "e.json"
    r = runner.invoke(app, ["eval", str(out), "--tasks", "wikitext2,c4", "--seqlen", "64", "--limit", "2", "--json", str(js)])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())[str(out)]
    for task in ("wikitext2", "c4"):
        assert res[task]["windows"] == 2 and res[task]["seqlen"] == 64 and res[task]["tokens"] == 2 * 63
        assert res[task]["ppl"] > 1
    assert "ctx 64" in r.output and "2/" in r.output
    r = runner.invoke(app, ["inspect", str(out), "--json", str(tmp_path / "i.json")])
    assert r.exit_code == 0 and "bits/weight" in r.output
    info = json.loads((tmp_path / "i.json").read_text())
    assert len(info["layers"]) == 21 and info["recipe"]["group_size"] == 64


def test_qwen2_with_biases(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    m = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    src = tmp_path / "qwen"
    m.save_pretrained(src)
    for f in TOKENIZER_FILES:
        shutil.copy(SMOLLM / f, src / f)
    out = tmp_path / "q"
    r = CliRunner().invoke(app, ["quantize", str(src), "-o", str(out), "--bits", "8", "--group-size", "32", "--nsamples", "2", "--seqlen", "32"])
    assert r.exit_code == 0, r.output
    q = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    attn = q.model.layers[0].self_attn
    assert isinstance(attn.q_proj, LlmqLinear) and attn.q_proj.bias is not None
    assert torch.equal(attn.q_proj.bias, m.model.layers[0].self_attn.q_proj.bias)
    x = torch.randint(0, 49152, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(q(x).logits, m(x).logits, rtol=0.05, atol=0.05)  # 8-bit: close to fp
