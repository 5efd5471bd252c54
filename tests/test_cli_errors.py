"""Bad input: one line on stderr naming the problem, exit code 2, and no output or work folder left."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llmq.cli", *map(str, args)], capture_output=True, text=True, env=env)


def assert_bad_input(p, out, *words):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = [l for l in p.stderr.splitlines() if l.startswith("llmq: error:")]
    assert len(lines) == 1, p.stderr[-2000:]
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial"))


@pytest.fixture()
def model_copy(tiny_model, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


def test_missing_path(tmp_path):
    out = tmp_path / "out"
    assert_bad_input(run_cli("quantize", tmp_path / "nope", "-o", out), out, "does not exist")


def test_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, BertModel

    d = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)).save_pretrained(d)
    out = tmp_path / "out"
    assert_bad_input(run_cli("quantize", d, "-o", out, "--calib", "none"), out, "not a causal language model")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)).save_pretrained(d)
    out = tmp_path / "out"
    assert_bad_input(run_cli("quantize", d, "-o", out, "--calib", "none"), out, "unsupported architecture", "gpt2")


def test_truncated_safetensors(model_copy, tmp_path):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out"
    assert_bad_input(run_cli("quantize", model_copy, "-o", out, "--calib", "none"), out, "truncated", "model.safetensors")


def test_corrupt_safetensors_header(model_copy, tmp_path):
    f = model_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"garbage!"
    f.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert_bad_input(run_cli("quantize", model_copy, "-o", out, "--calib", "none"), out, "corrupt")


@pytest.mark.parametrize("args,words", [
    (["--bits", "9"], ["bits", "9"]),
    (["--bits", "1"], ["bits"]),
    (["--group-size", "-1"], ["group size"]),
    (["--group-size", "4"], ["group size"]),
    (["--method", "magic"], ["unknown method"]),
])
def test_bad_options(tiny_model, tmp_path, args, words):
    out = tmp_path / "out"
    assert_bad_input(run_cli("quantize", tiny_model, "-o", out, "--calib", "none", *args), out, *words)


def test_empty_calibration_set(tiny_model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    out = tmp_path / "out"
    assert_bad_input(run_cli("quantize", tiny_model, "-o", out, "--calib", empty, "--nsamples", 2, "--seqlen", 32), out, "empty")


def test_nan_weights(model_copy, tmp_path):
    f = model_copy / "model.safetensors"
    t = load_file(f)
    t["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(t, f, metadata={"format": "pt"})
    out = tmp_path / "out"
    assert_bad_input(run_cli("quantize", model_copy, "-o", out, "--calib", "none"), out, "nan", "model.layers.1.mlp.up_proj")


def test_existing_output_is_not_overwritten(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    p = run_cli("quantize", tiny_model, "-o", out, "--calib", "none")
    assert p.returncode == 2 and "already exists" in p.stderr
    assert (out / "keep.txt").exists()


def test_eval_and_inspect_bad_paths(tmp_path, tiny_model):
    p = run_cli("eval", tmp_path / "nope", "--limit", "1")
    assert p.returncode == 2 and "does not exist" in p.stderr
    p = run_cli("inspect", tiny_model)
    assert p.returncode == 2 and "not an llmq checkpoint" in p.stderr
    p = run_cli("eval", tiny_model, "--tasks", "nosuchtask")
    assert p.returncode == 2 and "unknown task" in p.stderr
