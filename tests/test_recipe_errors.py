"""Recipes are parsed into typed values (issue 26): every bad value, in a recipe file or a flag, is one line on
stderr and exit 2 before any work starts (no OUT, no .OUT.partial); a value for a field or option the method does
not use is refused; and each method's declared capabilities match what its code reads."""

import inspect
import re
import sys
from pathlib import Path

import pytest
import torch

from llmq.errors import InputError
from llmq.methods import METHODS
from llmq.methods.options import COMMON_FIELDS
from llmq.recipe import LayerSpec, Recipe
from test_cli_errors import run_cli

DATA_FREE = ["--calib", "none"]
CALIB = ["--calib", "c4", "--nsamples", "2", "--seqlen", "32"]  # so a refusal cannot come from "needs calibration"


def assert_one_line_error(p, out, *words):
    """Exit 2, stderr exactly one `llmq: error:` line naming `words`, nothing written."""
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmq: error: "), p.stderr[-2000:]
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial"))


# ---- through the CLI: what was seen in issue 26 ------------------------------------------------------------------

@pytest.mark.parametrize("recipe,args,words", [
    ('sym: "false"\n', DATA_FREE, ["sym must be true or false", "'false'"]),
    ('mse_clip: "no"\n', DATA_FREE, ["mse_clip must be true or false"]),
    ('true_sequential: "false"\n', DATA_FREE, ["true_sequential must be true or false"]),
    ('rotate: residual\nrotate_vo: "maybe"\n', DATA_FREE, ["rotate_vo must be true or false"]),
    ("options: {dim: 2}\n", DATA_FREE, ["rtn does not use dim"]),
    ("options: {salient_ratio: 0.5}\n", DATA_FREE, ["rtn does not use salient_ratio"]),
    ("method: gptq\noptions: {dim: 2}\n", CALIB, ["gptq does not use dim"]),
    ("method: gptq\noptions: {salient_ratio: 0.5}\n", CALIB, ["gptq does not use salient_ratio"]),
    ("method: gptq\noptions: {dmap: 0.1}\n", CALIB, ["gptq does not use dmap"]),  # a typo is not ignored
    ("options: {dmap: 0.1}\n", DATA_FREE, ["rtn does not use dmap", "takes no options"]),
    ("method: gptq\noptions: {damp: lots}\n", CALIB, ["damp", "'lots'"]),
    ("method: gptq\noptions: {damp: -5}\n", CALIB, ["damp", "-5"]),
    ("method: gptq\noptions: {block_size: 0}\n", CALIB, ["block_size", "0"]),
    ("overrides: [7]\n", DATA_FREE, ["override #1", "mapping"]),
    ("overrides: [{match: 5}]\n", DATA_FREE, ["override #1", "match", "regex"]),
    ("options: 5\n", DATA_FREE, ["options must be a mapping"]),
    ("method: none\n", DATA_FREE, ["nothing to quantize"]),
    ("method: none\noverrides: [{match: 'mlp', method: none}]\n", DATA_FREE, ["nothing to quantize"]),
    ("method: gptq\noptions: {damp: 0.1}\n", ["--method", "rtn", *DATA_FREE], ["rtn does not use damp"]),  # flag over recipe
])
def test_bad_recipe(tiny_model, tmp_path, recipe, args, words):
    rec, out = tmp_path / "r.yaml", tmp_path / "out"
    rec.write_text(recipe)
    assert_one_line_error(run_cli("quantize", tiny_model, "-o", out, "--recipe", rec, *args), out, *words)


def test_binary_recipe_file(tiny_model, tmp_path):
    rec, out = tmp_path / "r.yaml", tmp_path / "out"
    rec.write_bytes(bytes(range(256)) * 4)
    assert_one_line_error(run_cli("quantize", tiny_model, "-o", out, "--recipe", rec, *DATA_FREE), out, "not utf-8 text")


@pytest.mark.parametrize("args,words", [
    (["--act-order", *DATA_FREE], ["rtn does not use act_order"]),
    (["--method", "e8p", "--group-size", "64", *DATA_FREE], ["e8p does not use group_size"]),
    (["--method", "billm", "--bits", "9", *CALIB], ["billm does not use bits"]),
    (["--method", "ternary", "--bits", "9", *DATA_FREE], ["ternary does not use bits"]),
    (["--method", "nf4", "--asym", *DATA_FREE], ["nf4 does not use sym"]),
])
def test_flag_the_method_does_not_use(tiny_model, tmp_path, args, words):
    out = tmp_path / "out"
    assert_one_line_error(run_cli("quantize", tiny_model, "-o", out, *args), out, *words)


# ---- typed parsing (no subprocess) -------------------------------------------------------------------------------

@pytest.mark.parametrize("d,match", [
    ({"sym": "false"}, "sym must be true or false"),
    ({"sym": 0}, "sym must be true or false"),
    ({"mse_clip": "no"}, "mse_clip must be true or false"),
    ({"true_sequential": "false"}, "true_sequential must be true or false"),
    ({"rotate_vo": "maybe"}, "rotate_vo must be true or false"),
    ({"bits": True}, "bits must be an integer"),
    ({"bits": 4.0}, "bits must be an integer"),
    ({"bits": "4"}, "bits must be an integer"),
    ({"group_size": False}, "group_size must be an integer"),
    ({"rotate_seed": 1.5}, "rotate_seed must be an integer"),
    ({"method": 5}, "method must be a string"),
    ({"rotate": True}, "rotate must be a string"),
    ({"rotate": "spin"}, "unknown rotation"),
    ({"options": 5}, "options must be a mapping"),
    ({"options": None}, "options must be a mapping"),
    ({"overrides": {"match": "x"}}, "overrides must be a list"),
    ({"overrides": [7]}, "override #1 must be a mapping"),
    ({"overrides": [{"bits": 3}]}, "override #1 has no 'match'"),
    ({"overrides": [{"match": 5}]}, "match must be a regex string"),
    ({"overrides": [{"match": "("}]}, "bad regex"),
    ({"overrides": [{"match": "x", "sym": "no"}]}, "override #1 .*sym must be true or false"),
    ({"overrides": [{"match": "x", "colour": 1}]}, "unknown keys"),
    ({"colour": 1}, "unknown keys"),
    ({"method": "gptq", "options": {"act_order": "yes"}}, "act_order must be true or false"),
    ({"method": "gptq", "options": {"damp": 0}}, "damp must be a number in \\(0"),
    ({"method": "gptq", "options": {"block_size": None}}, "block_size must be an integer"),
    ({"method": "gptq", "options": {"block_size": True}}, "block_size must be an integer"),
    ({"method": "higgs", "options": {"dim": True}}, "dim must be 1 or 2"),
    ({"method": "higgs", "options": {"scale": 1}}, "scale must be rms or mse"),
    ({"method": "vq", "options": {"dim": 2.0}}, "dim must be 2, 4 or 8"),
    ({"method": "vq", "options": {"index_bits": None}}, "index_bits must be an integer"),
    ({"method": "vq", "options": {"dim": 8}}, "needs 32-bit indices"),  # bits 4 x dim 8: refused up front
    ({"method": "pbllm", "options": {"damp": float("nan")}}, "damp must be a number"),
    ({"method": "none"}, "nothing to quantize"),
    ({"method": "none", "options": {"damp": 0.1}, "overrides": [{"match": "x", "method": "rtn"}]}, "takes no options"),
])
def test_typed_parsing_refuses(d, match):
    with pytest.raises(InputError, match=match):
        Recipe.from_dict(d)


def test_typed_parsing_accepts_yaml_types(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("method: gptq\nbits: 3\ngroup_size: 0\nsym: no\nmse_clip: yes\ntrue_sequential: true\n"
                 "rotate: residual\nrotate_seed: 7\nrotate_vo: false\noptions: {damp: 0.05, act_order: false, block_size: 64}\n"
                 "overrides:\n  - {match: 'down_proj', bits: 8}\n")
    r = Recipe.from_yaml(f)
    assert r.default == LayerSpec("gptq", 3, 0, False, True, {"damp": 0.05, "act_order": False, "block_size": 64})
    assert (r.true_sequential, r.rotate, r.rotate_seed, r.rotate_vo) == (True, "residual", 7, False)
    assert r.spec_for("model.layers.0.mlp.down_proj").bits == 8
    assert r.spec_for("model.layers.0.mlp.up_proj").bits == 3
    assert Recipe.from_dict({"method": "billm", "options": {"salient_max": None}})  # null: searched (billm's own meaning)


@pytest.mark.parametrize("d,match", [
    ({"method": "e8p", "group_size": 64}, "recipe: e8p does not use group_size"),
    ({"method": "billm", "bits": 4}, "billm does not use bits"),  # even a value equal to the default: it was given
    ({"method": "vq", "sym": True}, "vq does not use sym"),
    ({"method": "higgs", "mse_clip": False}, "higgs does not use mse_clip"),
    ({"options": {"act_order": True}}, "rtn does not use act_order"),
    ({"method": "rtn", "overrides": [{"match": "x", "method": "nf4", "bits": 4}]}, "override #1: nf4 does not use bits"),
    ({"method": "none", "bits": 3, "overrides": [{"match": "x", "method": "nf4"}]}, "method none .* does not use bits"),
])
def test_given_field_the_method_does_not_use(d, match):
    with pytest.raises(InputError, match=match):
        Recipe.from_dict(d)


def test_inherited_values_are_not_refused():
    # a top-level field that an override's method uses is not refused for the top-level method
    r = Recipe.from_dict({"method": "none", "bits": 3, "overrides": [{"match": "mlp", "method": "rtn"}]})
    assert r.spec_for("model.layers.0.mlp.up_proj").bits == 3
    # options belong to the method they were written for: an override switching method does not inherit them
    r = Recipe.from_dict({"method": "gptq", "options": {"damp": 0.1}, "overrides": [{"match": "mlp", "method": "rtn"}]})
    assert r.spec_for("model.layers.0.mlp.up_proj").options == {}
    assert r.spec_for("model.layers.0.self_attn.q_proj").options == {"damp": 0.1}
    r = Recipe.from_dict({"method": "gptq", "options": {"damp": 0.1}, "overrides": [{"match": "lm_head", "method": "gptq"}]})
    assert r.spec_for("lm_head").options == {"damp": 0.1}  # back to gptq after the built-in lm_head -> none


@pytest.mark.parametrize("method", sorted(METHODS))
def test_defaults_the_cli_fills_in_are_not_refused(method):
    r = Recipe.from_cli(None, method=method)  # bits 4, group size 128 (nf4: 64), sym: defaults, not given
    assert r.default.method == method
    assert r.default.group_size == (64 if method == "nf4" else 128)


def test_flags_apply_on_top_of_the_recipe(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("method: gptq\nbits: 3\nrotate: hadamard\noptions: {damp: 0.05}\n")
    r = Recipe.from_cli(f, bits=4, sym=False, act_order=False, true_sequential=True)
    assert r.default == LayerSpec("gptq", 4, 128, False, False, {"damp": 0.05, "act_order": False})
    assert r.true_sequential and r.rotate == "hadamard"  # --rotate none (the flag's default) keeps the recipe's
    assert Recipe.from_cli(f, rotate="residual").rotate == "residual"
    with pytest.raises(InputError, match="e8p does not use sym"):
        Recipe.from_cli(None, method="e8p", sym=True)
    f.write_text("method: gptq\noptions: [1]\n")
    with pytest.raises(InputError, match="options must be a mapping"):
        Recipe.from_cli(f, act_order=True)


# ---- declared capabilities match the code ------------------------------------------------------------------------

OPTION_READ = re.compile(r"""\bo\.([a-z]\w*)\b(?!\()""")  # `o = self.options(spec)`, then o.damp, ...


def options_read(method) -> set:
    """Every option the method's module reads from its typed options (vq passes them all on as keywords)."""
    mod = sys.modules[type(method).__module__]
    keys = set(OPTION_READ.findall(inspect.getsource(mod)))
    if method.name == "vq":
        keys |= set(inspect.signature(mod.vq_quantize).parameters) - {"w", "H"}
    return keys


def option_names(method) -> set:
    return {f.name for f in method.option_fields()}


def test_option_scan_finds_reads():
    assert {"act_order", "damp", "block_size", "fp64"} <= options_read(METHODS["gptq"])  # the scan itself works
    assert {"dim", "index_bits", "kmeans_sample"} <= options_read(METHODS["vq"])


@pytest.mark.parametrize("name", sorted(METHODS))
def test_declared_options_are_what_the_method_reads(name):
    m = METHODS[name]
    assert set(m.uses_fields) <= set(COMMON_FIELDS)
    assert option_names(m) == options_read(m)  # no real option refused, no refused-looking option ignored
    assert all(f.metadata["doc"] for f in m.option_fields())


CANDIDATES = [False, 0.05, 2, 32, "mse", "int8"]  # the first one a schema accepts is tried


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_option_read_is_accepted_and_runs(name):
    m = METHODS[name]
    w, H = layer()
    for key in sorted(options_read(m)):
        ok, _ = {f.name: f for f in m.option_fields()}[key].metadata["check"]
        value = next(v for v in CANDIDATES if ok(v))
        d = {"method": name, "options": {key: value}}
        if "group_size" in m.uses_fields:
            d["group_size"] = 32
        spec = Recipe.from_dict(d).default
        assert spec.options == {key: value}
        m.quantize(w, spec, H).pack()  # an accepted value is one the method can run with


def layer():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g) * 0.05
    x = torch.randn(256, 64, generator=g)
    return w, 2 * x.T @ x / x.shape[0]


VARIANTS = {"bits": 3, "group_size": 64, "sym": False, "mse_clip": True}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_uses_fields_is_what_changes_the_result(name):
    """A field in uses_fields changes the quantized layer; a field outside it does not (so refusing it loses nothing)."""
    m = METHODS[name]
    w, H = layer()
    base = LayerSpec(method=name, bits=4, group_size=32, sym=True, mse_clip=False)
    ref = m.quantize(w, base, H).pack()
    for field, value in VARIANTS.items():
        got = m.quantize(w, LayerSpec(**{**vars(base), field: value}), H).pack()
        same = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
        assert same == (field not in m.uses_fields), (name, field)


def test_readme_table_matches_the_declared_capabilities():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, m in METHODS.items():
        row = re.search(rf"^\| {name} \| (.*) \| (.*) \|$", readme, re.M)
        assert row, name
        fields, options = ({x.strip() for x in cell.split(",")} - {"—"} for cell in row.groups())
        assert fields == set(m.uses_fields) and options == option_names(m), name


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_refuses_an_unknown_option(name):
    with pytest.raises(InputError, match=f"recipe: {name} does not use dmap"):
        Recipe.from_dict({"method": name, "options": {"dmap": 0.1}})
