"""Every format's checkpoint (the CLI's) reloads in transformers with exactly the logits of the same quantization done in
memory, its layer config and tensors are the ones the format and the layer's transforms declare, and `llmq inspect`
counts every stored byte."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from conftest import tensors_of
from llmq.api import quantize_
from llmq.cli import app
from llmq.formats.vq import vq_bits
from llmq.inspect_ckpt import inspect_checkpoint
from llmq.recipe import Recipe

LAYER, OUT, IN = "model.layers.1.mlp.down_proj", 96, 160  # tiny_model's MLP: 160 inputs, 96 outputs
ROT = [("hadamard", "had_in_signs")]  # --rotate hadamard: V first, Uᵀ on the output
SIGN_BYTES = 4 * (5 + 3)  # the rotation's sign bits in int32 words: 160 inputs, 96 outputs


def e8p_bytes(bits, rotated):
    return OUT * IN * bits // 8 + 4 * (1 if bits == 2 else 2) + (SIGN_BYTES if rotated else 0)


# id -> (method, recipe, calibration, input transforms (kind, tensor) of LAYER, exact stored bytes of LAYER or None)
CASES = {
    "int4-sym": ("rtn", {"bits": 4, "group_size": 64, "sym": True}, False, [], OUT * (IN // 2 + 2 * 3)),
    "int3-asym": ("gptq", {"bits": 3, "group_size": 64, "sym": False}, True, [], OUT * (4 * 15 + 2 * 3 + 3)),
    "int3-rotated": ("gptq", {"bits": 3, "group_size": 32, "rotate": "hadamard"}, True, ROT, OUT * (4 * 15 + 2 * 5) + SIGN_BYTES),
    "nf4": ("nf4", {"group_size": 64}, False, [], None),
    "any4": ("any4", {"group_size": 64}, True, [], None),
    "higgs4": ("higgs", {"bits": 4, "group_size": 64}, False, [("hadamard", "lut_signs")], None),
    "higgs3-d2": ("higgs", {"bits": 3, "options": {"dim": 2}}, False, [("hadamard", "lut_signs")], None),
    "higgs-h32": ("higgs", {"bits": 4, "group_size": 32, "options": {"dim": 2, "hadamard_size": 32}}, False,
                  [("hadamard", "lut_signs")], None),
    "higgs-colscale": ("higgs", {"bits": 4, "group_size": 64, "options": {"dim": 2, "column_scale": True}}, False,
                       [("channel_scale", "lut_input_scale"), ("hadamard", "lut_signs")], None),
    "higgs-rotated": ("higgs", {"bits": 4, "group_size": 64, "rotate": "hadamard", "options": {"column_scale": True}}, False,
                      ROT + [("channel_scale", "lut_input_scale"), ("hadamard", "lut_signs")], None),
    "e8p2-rotated": ("e8p", {"bits": 2, "rotate": "hadamard"}, True, ROT, e8p_bytes(2, True)),
    "e8p3": ("e8p", {"bits": 3}, False, [], e8p_bytes(3, False)),
    "vq2": ("vq", {"bits": 2}, True, [], vq_bits(OUT, IN, 4, 8, 0, "fp16") // 8),
    "vq3-rotated": ("vq", {"bits": 3, "rotate": "hadamard"}, True, ROT, vq_bits(OUT, IN, 2, 6, 0, "fp16") // 8 + SIGN_BYTES),
    "vq2-rotated-nocalib": ("vq", {"bits": 2, "rotate": "hadamard"}, False, ROT, vq_bits(OUT, IN, 4, 8, 0, "fp16") // 8 + SIGN_BYTES),
    "billm": ("billm", {}, True, [], None),
    "pbllm": ("pbllm", {"group_size": 32}, True, [], None),
    "ternary-rotated": ("ternary", {"group_size": 64, "rotate": "hadamard"}, True, ROT, None),
}


def cli_args(method: str, recipe: dict, calib: bool, tmp_path) -> list[str]:
    """The CLI spelling of a recipe (options go through a recipe file)."""
    args = ["--method", method]
    for key, flag in (("bits", "--bits"), ("group_size", "--group-size"), ("rotate", "--rotate")):
        if key in recipe:
            args += [flag, str(recipe[key])]
    if "sym" in recipe:
        args.append("--sym" if recipe["sym"] else "--asym")
    if "options" in recipe:
        rec = tmp_path / "r.yaml"
        rec.write_text(json.dumps({"method": method, "options": recipe["options"]}))  # JSON is YAML
        args += ["--recipe", str(rec)]
    return args + (["--nsamples", "4", "--seqlen", "64"] if calib else ["--calib", "none"])


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_reloads_with_identical_logits(tiny_model, tmp_path, ids, case):
    method, recipe, calib, transforms, expect_bytes = CASES[case]
    out = tmp_path / "q"
    r = CliRunner().invoke(app, ["quantize", str(tiny_model), "-o", str(out), *cli_args(method, recipe, calib, tmp_path)])
    assert r.exit_code == 0, r.output
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    quantize_(ref, Recipe.from_dict({"method": method, **recipe}), calib_ids=ids if calib else None)
    fp = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    x = ids[:2]
    with torch.no_grad():
        got = loaded(x).logits
        assert torch.equal(got, ref(x).logits)
        assert not torch.allclose(got, fp(x).logits, atol=1e-3)  # really quantized

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    lc = qc["layers"][LAYER]
    assert lc["method"] == method and lc["format"] == {"rtn": "int", "gptq": "int", "nf4": "lut", "any4": "lut", "higgs": "lut"}.get(method, method)
    assert [(e["kind"], e.get("signs") or e.get("tensor")) for e in lc.get("input_transforms", [])] == transforms
    rotated = recipe.get("rotate") == "hadamard"
    assert lc.get("output_transforms", []) == ([{"kind": "hadamard", "size": [12, 8], "signs": "had_out_signs", "inverse": True}]
                                               if rotated else [])
    t = tensors_of(out)
    named = {tensor for _, tensor in transforms} | ({"had_out_signs"} if rotated else set())
    assert named <= {k[len(LAYER) + 1:] for k in t if k.startswith(LAYER + ".")}
    info = inspect_checkpoint(str(out))
    row = next(x for x in info["layers"] if x["layer"] == LAYER)
    stored = sum(v.numel() * v.element_size() for k, v in t.items() if k.startswith(LAYER + ".") and not k.endswith(".bias"))
    assert row["bytes"] == stored and row["bpw"] == 8 * stored / (OUT * IN)
    if expect_bytes is not None:
        assert stored == expect_bytes


def v1_layer_config(lc: dict) -> dict:
    """The version-1 spelling of a layer config (what llmq wrote before the transform lists)."""
    lc = dict(lc)
    for e in lc.pop("input_transforms", []) + lc.pop("output_transforms", []):
        name = e.get("signs") or e.get("tensor")
        if name == "lut_input_scale":
            lc["lut_input_scale"] = True
        elif name == "lut_signs":
            lc["lut_had"] = e["size"]
            if e.get("block"):
                lc["lut_had_block"] = e["block"]
        else:
            lc[{"had_in_signs": "had_in", "had_out_signs": "had_out"}[name]] = e["size"]
    return lc


@pytest.mark.parametrize("case", ["higgs-rotated", "higgs-h32"])
def test_version_1_checkpoint_loads_with_identical_logits(tiny_model, tmp_path, ids, case):
    """A checkpoint whose config spells the transforms the version-1 way (rotate/had_in/had_out, lut_had/lut_had_block/
    lut_input_scale) and says format_version 1 computes exactly what the version-2 spelling does; unknown versions
    are still refused."""
    from llmq.checkpoint import validate_checkpoint
    from llmq.errors import InputError

    method, recipe, calib, _, _ = CASES[case]
    out = tmp_path / "q"
    r = CliRunner().invoke(app, ["quantize", str(tiny_model), "-o", str(out), *cli_args(method, recipe, calib, tmp_path)])
    assert r.exit_code == 0, r.output
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids[:2]).logits
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["format_version"] == 2
    qc["format_version"] = 1
    qc["layers"] = {k: v1_layer_config(v) for k, v in qc["layers"].items()}
    assert "lut_had" in qc["layers"][LAYER] and "input_transforms" not in qc["layers"][LAYER]
    (out / "config.json").write_text(json.dumps(config))
    validate_checkpoint(out)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(ids[:2]).logits, want)
    qc["format_version"] = 99
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="format version 99"):
        validate_checkpoint(out)
