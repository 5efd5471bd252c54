"""End to end on a tiny model: CLI quantize -> checkpoint on disk -> from_pretrained, against the
in-memory quantized model; sizes on disk; recipes; loud failure without llmq."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from llmq.api import quantize_
from llmq.cli import app
from llmq.inspect_ckpt import inspect_checkpoint
from llmq.modules import LlmqLinear
from llmq.recipe import Recipe

from conftest import tensors_of

runner = CliRunner()


def cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r


@pytest.mark.parametrize("bits,group,sym", [(4, 64, True), (3, 64, False), (2, 0, True), (8, 32, False)])
def test_cli_checkpoint_reloads_identical_to_in_memory(tiny_model, tmp_path, ids, bits, group, sym):
    out = tmp_path / "q"
    r = cli("quantize", tiny_model, "-o", out, "--bits", bits, "--group-size", group, "--sym" if sym else "--asym",
            "--nsamples", 4, "--seqlen", 64)
    assert r.exit_code == 0, r.output
    assert not (tmp_path / ".q.partial").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    qlayers = [m for m in loaded.modules() if isinstance(m, LlmqLinear)]
    assert len(qlayers) == 3 * 7

    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    quantize_(ref, Recipe.from_dict({"bits": bits, "group_size": group, "sym": sym}), calib_ids=ids)
    x = ids[:2]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref(x).logits)
    # and quantization changed the function, so the comparison means something
    fp = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        assert not torch.equal(fp(x).logits, ref(x).logits)


def test_bits_per_weight_on_disk(tiny_model, tmp_path):
    out = tmp_path / "q"
    assert cli("quantize", tiny_model, "-o", out, "--bits", 4, "--group-size", 64, "--calib", "none").exit_code == 0
    info = inspect_checkpoint(str(out))
    # 96-wide rows at g64: groups of 64 and 32 -> 2 fp16 scales per 96 weights; 160-wide: 3 per 160
    expected = {96: 4 + 2 * 16 / 96, 160: 4 + 3 * 16 / 160}
    for layer in info["layers"]:
        assert layer["bpw"] == pytest.approx(expected[layer["in_features"]])
    t = tensors_of(out)
    assert t["model.layers.0.self_attn.q_proj.qweight"].shape == (96, 96 * 4 // 32)
    assert t["model.layers.0.self_attn.q_proj.scales"].shape == (96, 2)
    assert t["model.layers.0.self_attn.q_proj.weight"].numel() == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "llmq" and cfg["format_version"] == 2
    assert cfg["layers"]["model.layers.0.mlp.down_proj"]["group_size"] == 64


def test_recipe_overrides_and_is_stored(tiny_model, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: rtn\nbits: 3\ngroup_size: 64\noverrides:\n  - match: 'mlp\\.down_proj'\n    bits: 8\n"
                      "  - match: 'layers\\.0\\.self_attn\\.v_proj'\n    method: none\n  - match: lm_head\n    method: rtn\n    bits: 4\n")
    out = tmp_path / "q"
    r = cli("quantize", tiny_model, "-o", out, "--recipe", recipe, "--calib", "none")
    assert r.exit_code == 0, r.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["layers"]["model.layers.1.mlp.down_proj"]["bits"] == 8
    assert qc["layers"]["model.layers.1.mlp.up_proj"]["bits"] == 3
    assert "model.layers.0.self_attn.v_proj" not in qc["layers"]
    assert qc["layers"]["lm_head"]["bits"] == 4
    assert qc["recipe"]["overrides"][0]["match"] == "mlp\\.down_proj"
    t = tensors_of(out)
    assert t["model.layers.0.self_attn.v_proj.weight"].shape == (48, 96)  # kept unquantized
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert isinstance(m.lm_head, LlmqLinear) and not isinstance(m.model.layers[0].self_attn.v_proj, LlmqLinear)
    assert m(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_plain_transformers_without_llmq_fails_loudly(tiny_model, tmp_path):
    out = tmp_path / "q"
    assert cli("quantize", tiny_model, "-o", out, "--calib", "none", "--group-size", 64).exit_code == 0
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(out)!r})"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode != 0
    assert "weight" in p.stderr and ("mismatch" in p.stderr.lower() or "size" in p.stderr.lower())


def test_save_pretrained_of_in_memory_model_round_trips(tiny_model, tmp_path, ids):
    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    quantize_(m, Recipe.from_dict({"bits": 3, "group_size": 64}), calib_ids=None)
    m.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(m(ids[:1]).logits, again(ids[:1]).logits)
