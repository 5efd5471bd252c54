"""Rotations: exact Hadamard constructions and orthogonal fast transforms for non-power-of-two sizes; the
rotated (unquantized) model computes the same function; rotated checkpoints reload identically; the
rotation lowers quantization error on the real model's layers."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import llmq  # noqa: F401
from conftest import SMOLLM, tensors_of
from llmq.api import quantize_
from llmq.cli import app
from llmq.errors import InputError
from llmq.inspect_ckpt import inspect_checkpoint
from llmq.recipe import Recipe
from llmq.rotation import LayerIncoherence, RandomizedHadamard, check_sizes, factor, fwht, hadamard_transform, rotate_
from llmq.rotation.hadamard import construction, dense_hadamard, paley1, paley2, random_signs, small_hadamard, sylvester

MODEL_SIZES = [576, 1536, 5120, 13824, 14336, 18944, 49152, 96, 160, 24, 4096]


@pytest.mark.parametrize("m", [2, 4, 12, 20, 28, 36, 44, 60, 68, 108, 148])
def test_small_hadamard_matrices_are_exact(m):
    h = small_hadamard(m)
    assert h.dtype == torch.int64 and set(h.unique().tolist()) <= {-1, 1}
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.int64))


def test_paley_constructions_and_factorisation():
    assert torch.equal(paley1(7) @ paley1(7).T, 8 * torch.eye(8, dtype=torch.int64))
    assert torch.equal(paley2(5) @ paley2(5).T, 12 * torch.eye(12, dtype=torch.int64))
    with pytest.raises(ValueError):
        paley1(13)  # 13 ≡ 1 mod 4
    expected = {576: (36, 16), 1536: (12, 128), 5120: (20, 256), 13824: (108, 128), 14336: (28, 512), 18944: (148, 128),
                4096: (1, 4096)}
    for n, mp in expected.items():
        assert factor(n) == mp and construction(mp[0]) is not None
    with pytest.raises(InputError, match="no Hadamard transform of size 52"):
        factor(52)  # 13·4: no construction of order 13, 26 or 52


@pytest.mark.parametrize("n", [1, 2, 8, 256, 4096])
def test_fwht_is_sylvester(n):
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ sylvester(n).to(torch.float64).T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", MODEL_SIZES)
def test_transform_is_orthogonal(n):
    m, p = factor(n)
    # exact: the Kronecker factors are integer Hadamard matrices, so (H_m ⊗ H_p)(H_m ⊗ H_p)ᵀ = n I exactly
    assert torch.equal(small_hadamard(m) @ small_hadamard(m).T, m * torch.eye(m, dtype=torch.int64))
    if n <= 1536:  # the fast transform is that matrix, and the matrix is orthogonal (fp64)
        T = dense_hadamard(n)
        eye = torch.eye(n, dtype=torch.float64)
        torch.testing.assert_close(hadamard_transform(eye, m, p), T.T, rtol=0, atol=1e-12)
        torch.testing.assert_close(T @ T.T, eye, rtol=0, atol=1e-12)
    x = torch.randn(4, n, dtype=torch.float64)
    rh = RandomizedHadamard(random_signs(n, "t"))
    y = rh.forward(x)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(rh.inverse(y), x, rtol=0, atol=1e-12)
    assert not torch.allclose(y, x)


def test_incoherence_preserves_layer_and_hessian_quadratic_form():
    torch.manual_seed(0)
    w, x = torch.randn(96, 160, dtype=torch.float64), torch.randn(50, 160, dtype=torch.float64)
    inc = LayerIncoherence.for_layer("a", "b", 160, 96)
    wt = inc.weight(w)
    torch.testing.assert_close(inc.output(inc.input(x) @ wt.T), x @ w.T, rtol=0, atol=1e-10)
    H, Ht = x.T @ x, inc.hessian(x.T @ x)
    d = torch.randn_like(w)  # any error E: tr(E H Eᵀ) = tr(Ẽ H̃ Ẽᵀ)
    torch.testing.assert_close(((inc.weight(d) @ Ht) * inc.weight(d)).sum(), ((d @ H) * d).sum(), rtol=1e-10, atol=0)
    # outliers are spread: max |w| / rms falls
    w[3, 7] = 50
    assert inc.weight(w).abs().max() / inc.weight(w).pow(2).mean().sqrt() < 0.2 * w.abs().max() / w.pow(2).mean().sqrt()


def test_unsupported_sizes_are_input_errors():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=52, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    for mode in ("hadamard", "residual", "both"):
        with pytest.raises(InputError, match="hidden size 52"):
            check_sizes(Recipe(rotate=mode), cfg)
    check_sizes(Recipe(rotate="none"), cfg)
    with pytest.raises(InputError, match="unknown rotation"):
        Recipe(rotate="spin").validate()


@pytest.fixture(scope="module")
def smollm():
    return AutoModelForCausalLM.from_pretrained(SMOLLM, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32).eval()


@pytest.mark.parametrize("mode", ["hadamard", "residual", "both"])
def test_rotated_smollm2_computes_the_same_function(smollm, mode):
    ids = torch.randint(0, smollm.config.vocab_size, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = smollm(ids).logits
        rot = rotate_(copy.deepcopy(smollm), mode)
        out = rot(ids).logits
    if mode != "hadamard":  # the residual rotation really changed the stored weights, and untied the head
        assert rot.lm_head.weight is not rot.model.embed_tokens.weight
        assert torch.equal(rot.model.norm.weight, torch.ones(576))
        e0, e1 = smollm.model.embed_tokens.weight, rot.model.embed_tokens.weight
        assert (e1 - e0).abs().max() > 0.01 and torch.allclose(e1.norm(dim=1), e0.norm(dim=1), rtol=1e-5)
    del rot
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 1e-3, rel
    assert torch.equal(out.argmax(-1), ref.argmax(-1))


def test_rotated_models_with_biases_compute_the_same_function():
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    models = [Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
              LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True))]
    for m in models:
        with torch.no_grad():
            for n, p in m.named_parameters():
                (p.uniform_(0.5, 1.5) if "norm" in n else p.normal_(0, 0.1))
        ids = torch.randint(0, 300, (2, 20))
        with torch.no_grad():
            ref = m(ids).logits
            for mode in ("hadamard", "residual", "both"):
                out = rotate_(copy.deepcopy(m), mode)(ids).logits
                assert float((out - ref).norm() / ref.norm()) < 1e-5, (type(m).__name__, mode)


@pytest.mark.parametrize("rotate,method", [("hadamard", "gptq"), ("residual", "rtn"), ("both", "gptq")])
def test_rotated_checkpoint_reloads_identical_to_in_memory(tiny_model, tmp_path, ids, rotate, method):
    out = tmp_path / "q"
    r = CliRunner().invoke(app, ["quantize", str(tiny_model), "-o", str(out), "--method", method, "--bits", "3", "--group-size", "32",
                                 "--rotate", rotate, "--nsamples", "4", "--seqlen", "64"])
    assert r.exit_code == 0, r.output
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    quantize_(ref, Recipe.from_dict({"method": method, "bits": 3, "group_size": 32, "rotate": rotate}), calib_ids=ids)
    with torch.no_grad():
        assert torch.equal(loaded(ids[:2]).logits, ref(ids[:2]).logits)
    cfg = json.loads((out / "config.json").read_text())
    qc, t = cfg["quantization_config"], tensors_of(out)
    assert qc["recipe"]["rotate"] == rotate
    q = "model.layers.1.self_attn.q_proj"
    if rotate in ("hadamard", "both"):
        assert qc["layers"][q]["rotate"] == "hadamard"
        assert qc["layers"][q]["input_transforms"] == [{"kind": "hadamard", "size": [12, 8], "signs": "had_in_signs"}]
        assert qc["layers"][q]["output_transforms"] == [{"kind": "hadamard", "size": [12, 8], "signs": "had_out_signs", "inverse": True}]
        assert qc["layers"]["model.layers.1.mlp.down_proj"]["input_transforms"][0]["size"] == [20, 8]
        assert t[q + ".had_in_signs"].shape == (3,) and t[q + ".had_out_signs"].shape == (3,)
        assert torch.equal(t[q + ".had_in_signs"], t["model.layers.1.self_attn.v_proj.had_in_signs"])  # shared input
        assert not torch.equal(t[q + ".had_out_signs"], t["model.layers.1.self_attn.k_proj.had_out_signs"][:3])
        info = inspect_checkpoint(str(out))  # bits per weight count the sign bits: 3 + fp16 scales per 32 + signs
        row = next(layer for layer in info["layers"] if layer["layer"] == q)
        assert row["bpw"] == pytest.approx(3 + 16 / 32 + 8 * (4 * 3 + 4 * 3) / (96 * 96))
    else:
        assert "rotate" not in qc["layers"][q] and q + ".had_in_signs" not in t
    if rotate in ("residual", "both"):  # untied head stored explicitly, norms folded to ones
        assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in t
        assert torch.equal(t["model.norm.weight"], torch.ones(96))
        assert torch.equal(t["model.layers.0.input_layernorm.weight"], torch.ones(96))


def test_rotation_lowers_rtn_error_on_tiny_model(tiny_model, ids):
    """3-bit RTN on a model with outlier weights: both rotations lower the mean layer output error."""
    errs = {}
    for rotate in ("none", "hadamard", "residual"):
        m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        rows = quantize_(m, Recipe.from_dict({"method": "rtn", "bits": 3, "group_size": 32, "rotate": rotate}), calib_ids=ids)
        errs[rotate] = sum(r["output_err"] for r in rows) / len(rows)
    assert errs["hadamard"] < 0.9 * errs["none"] and errs["residual"] < 0.9 * errs["none"], errs


def test_cli_rejects_bad_rotation(tiny_model, tmp_path):
    r = CliRunner().invoke(app, ["quantize", str(tiny_model), "-o", str(tmp_path / "q"), "--rotate", "spin", "--calib", "none"])
    assert r.exit_code == 2 and "unknown rotation" in r.output


@pytest.mark.parametrize("n", [576, 1536, 4096, 96])
def test_gpu_kernel_reference_applies_the_same_transform(n):
    """On CUDA the online transforms go to llmq.kernels' fused Hadamard kernel; its torch reference (the
    kernel's yardstick) must compute exactly our U x and Uᵀ y with the H_m we hand it."""
    from llmq.kernels.hadamard import hadamard_ref

    r = RandomizedHadamard(random_signs(n, "k"))
    hm = None if r.m == 1 else small_hadamard(r.m).float()
    x = torch.randn(5, n)
    torch.testing.assert_close(hadamard_ref(x, hm, r.signs), r.forward(x), rtol=0, atol=1e-5)
    torch.testing.assert_close(hadamard_ref(x, hm, r.signs, inverse=True), r.inverse(x), rtol=0, atol=1e-5)
