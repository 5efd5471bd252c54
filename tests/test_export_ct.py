"""`llmq export --format compressed-tensors`: the files equal what compressed-tensors' own compressor writes for
the same integer codes and scales; transformers loads them (through compressed-tensors, not llmq) with logits
identical to the llmq checkpoint; what the format cannot hold is refused with exit code 2."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import llmq  # noqa: F401  (loads the llmq checkpoint for comparison)
from llmq.cli import app
from llmq.errors import InputError
from llmq.eval.compare import bits_per_weight
from llmq.export.compressed_tensors import check_exportable
from llmq.modules import LlmqLinear

from conftest import tensors_of

ct = pytest.importorskip("compressed_tensors")
runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def _reference_decode(monkeypatch):
    # llmq's side on its reference decode + F.linear, which the export must match bit for bit (the fused CPU
    # kernels round activations to bf16: llmq.kernels.cpu)
    monkeypatch.setenv("LLMQ_KERNELS", "torch")


@pytest.fixture(scope="module")
def w4g32(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ct") / "q"
    r = cli("quantize", tiny_model, "-o", out, "--bits", 4, "--group-size", 32, "--sym", "--calib", "none")
    assert r.exit_code == 0, r.output
    return out


def test_export_matches_compressed_tensors_and_loads_without_llmq(w4g32, tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    dest = tmp_path / "ct"
    r = cli("export", w4g32, "-o", dest, "--format", "compressed-tensors")
    assert r.exit_code == 0, r.output
    qc = json.loads((dest / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # compressed-tensors reads our config
    scheme = parsed.config_groups["group_0"]
    assert scheme.weights.num_bits == 4 and scheme.weights.group_size == 32 and parsed.ignore == ["lm_head"]

    llmq_model = AutoModelForCausalLM.from_pretrained(w4g32, dtype=torch.float32)
    exported = tensors_of(dest)
    layers = {n: m for n, m in llmq_model.named_modules() if isinstance(m, LlmqLinear)}
    assert len(layers) == 21
    for name, mod in layers.items():
        # compressed-tensors' own compressor, from the dequantized weight and the same scales
        w = mod.dequantize()
        scale = mod.scales.to(torch.float32)
        theirs = PackedQuantizationCompressor.compress(
            {"weight": w, "weight_scale": scale, "weight_zero_point": torch.zeros_like(scale, dtype=torch.int8)}, scheme)
        assert set(theirs) == {"weight_packed", "weight_scale", "weight_shape"}
        for k, t in theirs.items():
            mine = exported[f"{name}.{k}"]
            assert mine.dtype == t.dtype and mine.shape == t.shape and torch.equal(mine, t), f"{name}.{k}"
        assert torch.equal(exported[f"{name}.weight_packed"], mod.qweight)  # the packed codes are copied as they are
    assert not any(k.endswith(("qweight", "scales")) for k in exported)

    plain = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
    assert not any(isinstance(m, LlmqLinear) for m in plain.modules())
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        a, b = plain(ids).logits, llmq_model(ids).logits
    assert torch.equal(a, b)


# A fresh process that never imports llmq: transformers (+ compressed-tensors) alone load the export.
PLAIN_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    torch.save(model(torch.arange(3, 40)[None]).logits, sys.argv[2])
assert not any(m == "llmq" or m.startswith("llmq.") for m in sys.modules), "llmq was imported"
print(model.config.quantization_config.quant_method.value)
"""


def test_gptq_act_order_exports_and_loads_without_llmq(tiny_model, tmp_path):
    """GPTQ's act-order (the default) uses static groups and stores no g_idx: the codes keep the original column
    order with group i = columns [i·g, (i+1)·g), the plain layout compressed-tensors holds."""
    q, dest = tmp_path / "gptq", tmp_path / "ct"
    r = cli("quantize", tiny_model, "-o", q, "--method", "gptq", "--bits", 4, "--group-size", 32, "--act-order",
            "--nsamples", 8, "--seqlen", 64)
    assert r.exit_code == 0, r.output
    qc = json.loads((q / "config.json").read_text())["quantization_config"]
    assert qc["recipe"]["options"]["act_order"] is True
    assert not any(c["act_order"] for c in qc["layers"].values()) and not any(k.endswith("g_idx") for k in tensors_of(q))
    r = cli("export", q, "-o", dest, "--format", "compressed-tensors")
    assert r.exit_code == 0, r.output

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", PLAIN_LOAD, dest, tmp_path / "logits.pt"], capture_output=True, text=True,
                       cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[-1] == "compressed-tensors"  # loaded through compressed-tensors' quantizer
    llmq_model = AutoModelForCausalLM.from_pretrained(q, dtype=torch.float32)
    with torch.no_grad():
        ours = llmq_model(torch.arange(3, 40)[None]).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), ours)
    # `llmq eval --compare` counts the stored bits of both: 4-bit codes + one scale per 32 weights (fp16; fp32 in the export)
    assert bits_per_weight(str(q)) == 4 + 16 / 32 and bits_per_weight(str(dest)) == 4 + 32 / 32


def test_export_refuses_what_the_format_cannot_hold(tiny_model, tmp_path):
    base = {"format": "int", "bits": 4, "group_size": 32, "sym": True, "act_order": False, "in_features": 96, "out_features": 96}
    assert check_exportable({"a": base}) == (4, 32)
    for change, words in [({"sym": False}, "asymmetric"), ({"bits": 3}, "3-bit"), ({"act_order": True}, "g_idx"),
                          ({"group_size": 64}, "does not divide"), ({"format": "codebook"}, "format"),
                          ({"rotate": "hadamard"}, "rotated")]:
        with pytest.raises(InputError, match=words):
            check_exportable({"a": {**base, **change}})
    with pytest.raises(InputError, match="different schemes"):
        check_exportable({"a": base, "b": {**base, "bits": 8}})

    asym = tmp_path / "asym"
    assert cli("quantize", tiny_model, "-o", asym, "--bits", 4, "--group-size", 32, "--asym", "--calib", "none").exit_code == 0
    r = cli("export", asym, "-o", tmp_path / "out")
    assert r.exit_code == 2 and "asymmetric" in r.output and not (tmp_path / "out").exists()
    r = cli("export", asym, "-o", tmp_path / "out", "--format", "gguf")
    assert r.exit_code == 2 and "unknown export format" in r.output
