"""Binary and ternary methods (BiLLM, PB-LLM, ternary): exact pack/unpack round trips, honest bits per weight, the
Triton kernels against the torch decode under the interpreter, checkpoints that reload with identical logits, and
quality properties on the real model's layers (BiLLM beats plain sign binarization; GPTQ feedback beats plain
absmean ternarization; each at the same storage)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from conftest import DATA, SMOLLM  # noqa: E402
from llmq.cli import app  # noqa: E402
from llmq.errors import InputError  # noqa: E402
from llmq.formats import get_format  # noqa: E402
from llmq.formats.billm import billm_bits  # noqa: E402
from llmq.formats.bitplanes import pack_signs, pack_trits, unpack_signs, unpack_trits  # noqa: E402
from llmq.methods.billm import billm_quantize  # noqa: E402
from llmq.methods.pbllm import pbllm_quantize  # noqa: E402
from llmq.methods.ternary import ternary_quantize  # noqa: E402
from llmq.modules import layer_tensor_specs  # noqa: E402
from llmq.quantize_block import packed_bits_per_weight, relative_output_error  # noqa: E402
from llmq.recipe import Recipe  # noqa: E402


def toy_layer(n=40, k=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[torch.rand(n, k, generator=g) < 0.01] *= 6  # a few outliers, like a trained layer
    x = torch.randn(256, k, generator=g) * (1 + 3 * torch.rand(k, generator=g))  # uneven input channels
    return w, 2 * x.T @ x / 256


QUANTIZERS = {
    "billm": lambda w, H: billm_quantize(w, H, max_bpw=2.0),  # toy sizes: scale overhead needs a looser budget
    "pbllm": lambda w, H: pbllm_quantize(w, H, salient_ratio=0.1, group_size=64),
    "ternary": lambda w, H: ternary_quantize(w, H, group_size=96),  # 300 = 3·96 + 12: a shorter last group
}


# ---- round trips -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 31, 32, 33, 300])
def test_sign_and_trit_planes_round_trip_exactly(n):
    g = torch.Generator().manual_seed(n)
    s = torch.randint(0, 2, (7, n), generator=g).float() * 2 - 1
    assert torch.equal(unpack_signs(pack_signs(s), n), s)
    t = torch.randint(-1, 2, (7, n), generator=g).float()
    b = pack_trits(t)
    assert b.dtype == torch.uint8 and b.shape == (7, -(-n // 5)) and int(b.max()) <= 242
    assert torch.equal(unpack_trits(b, n), t)
    with pytest.raises(ValueError):
        pack_trits(t * 2)


@pytest.mark.parametrize("fmt", sorted(QUANTIZERS))
def test_packed_layer_round_trips_and_matches_specs(fmt):
    w, H = toy_layer()
    q = QUANTIZERS[fmt](w, H)
    t, cfg = q.pack(), q.layer_config()
    assert cfg["format"] == fmt
    specs = layer_tensor_specs(cfg)  # what a loader allocates from the config alone
    assert set(specs) == set(t) and all(tuple(t[k].shape) == specs[k][0] and t[k].dtype == specs[k][1] for k in t)
    W = get_format(fmt).dequantize(t, cfg)
    if fmt == "billm":  # decode by hand from the unpacked values: every weight is one of the documented forms
        sc = q.scales.double()
        sal = torch.zeros(300, dtype=torch.bool)
        sal[q.salient] = True
        assert cfg["salient_columns"] > 0 and cfg["sparse_per_block"] > 0
        sp = torch.zeros(40, 300, dtype=torch.bool)
        for b in range(q.sparse_idx.shape[1]):
            for off in q.sparse_idx[:, b].long().T:
                ok = off != 255
                sp[torch.arange(40)[ok], b * 128 + off[ok]] = True
        exp = torch.where(sp, sc[:, 1:2], sc[:, 0:1]) * q.signs.double()
        s2 = torch.zeros(40, 300, dtype=torch.float64)
        s2[:, sal] = q.signs2.double()
        exp = torch.where(sal[None, :], sc[:, 2:3] * q.signs.double() + sc[:, 3:4] * s2, exp)
        assert not (sp & sal[None, :]).any()
    elif fmt == "pbllm":
        gi = torch.arange(300) // 64
        exp = q.scales.double()[:, gi] * q.signs.double()
        col = q.sparse_idx.long() + torch.arange(q.sparse_idx.shape[1])[None, :, None] * 128
        ok = q.sparse_idx != 255
        rows = torch.arange(40)[:, None, None].expand_as(col)
        exp[rows[ok], col[ok]] = q.sparse_q.double()[ok] * q.sparse_scale.double()[rows[ok]]
        assert (q.sparse_q[ok] != 0).float().mean() > 0.9 and int(ok.sum(-1)[:, 0].min()) == round(0.1 * 128)
    else:
        exp = q.trits.double() * q.scales.double()[:, torch.arange(300) // 96]
        assert set(q.trits.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.equal(W.double(), exp)
    # the packed tensors survive a safetensors round trip bit for bit
    from safetensors.torch import load, save

    back = load(save(t))
    assert all(torch.equal(back[k], t[k]) for k in t)


# ---- bits per weight ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm_block0():
    """Block 0 of the shared SmolLM2 with its layers' Hessians from 8 C4 windows of 256 tokens."""
    from llmq.adapters import adapter_for
    from llmq.blocks import BlockFactory
    from llmq.calib import CalibConfig, calibration_ids
    from llmq.quantize_block import Calibration, collect_hessians
    from llmq.source import ModelSource

    src = ModelSource(str(SMOLLM))
    adapter = adapter_for(src.config)
    factory = BlockFactory(src.config, adapter)
    ids = calibration_ids(CalibConfig("c4", 8, 256, 0, str(DATA)), src.tokenizer())
    hidden = F.embedding(ids, src.tensors.get("model.embed_tokens.weight").float())
    state = {k[len("model.layers.0."):]: src.tensors.get(k) for k in src.tensors.keys() if k.startswith("model.layers.0.")}
    block = factory.block(0, state)
    hess = collect_hessians(block, adapter, Calibration(hidden, factory.position_embeddings(256), 4))
    return {n: (block.get_submodule(n).weight.detach().float(), hess[n]) for n in adapter.linears}


def sign_binarize(w):
    """Plain 1-bit baseline: σ = sign w, α = mean |w| per row."""
    return torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(1, keepdim=True)


def test_billm_real_layers_within_1p3_bits_and_better_than_sign(smollm_block0):
    for name, (w, H) in smollm_block0.items():
        q = billm_quantize(w, H)
        t, cfg = q.pack(), q.layer_config()
        bpw = packed_bits_per_weight(t, cfg)
        assert bpw == billm_bits(*w.shape, cfg["salient_columns"], cfg["sparse_per_block"]) / w.numel()
        assert bpw <= 1.3, (name, bpw)
        assert cfg["salient_columns"] > 0 and cfg["sparse_per_block"] >= 1
        err = relative_output_error(w, q.dequantize(), H)
        base = relative_output_error(w, sign_binarize(w), H)
        assert err < 0.5 * base, (name, err, base)


def test_ternary_feedback_beats_plain_absmean_on_real_layers(smollm_block0):
    for name in ("self_attn.k_proj", "self_attn.o_proj", "mlp.down_proj"):
        w, H = smollm_block0[name]
        plain = relative_output_error(w, ternary_quantize(w, None).dequantize(), H)  # BitNet b1.58 absmean, per group
        fb = relative_output_error(w, ternary_quantize(w, H, refit=False).dequantize(), H)
        fb_refit = relative_output_error(w, ternary_quantize(w, H).dequantize(), H)
        assert fb < plain and fb_refit < fb, (name, plain, fb, fb_refit)


def test_pbllm_real_layer_beats_binary_and_keeps_salient_weights(smollm_block0):
    w, H = smollm_block0["self_attn.q_proj"]
    q = pbllm_quantize(w, H)
    err = relative_output_error(w, q.dequantize(), H)
    assert err < relative_output_error(w, sign_binarize(w), H) / 10
    # 10% of weights in 8 bits (8-bit offset + 8-bit code) + 1 sign bit + fp16 α per 128 + fp16 8-bit scale per row
    assert packed_bits_per_weight(q.pack(), q.layer_config()) == pytest.approx(1 + 16 * 13 * 5 / 576 + 16 * 5 / 576 + 16 / 576)


# ---- kernels -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", sorted(QUANTIZERS))
@pytest.mark.parametrize("m,dtype", [(1, torch.float16), (5, torch.float32), (20, torch.bfloat16), (3, torch.float16)])
def test_binary_kernels_match_reference(fmt, m, dtype):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    from llmq.kernels.binary_triton import binary_matmul_triton
    from llmq.kernels.dispatch import quant_linear

    w, H = toy_layer()
    q = QUANTIZERS[fmt](w, H)
    t, cfg = q.pack(), q.layer_config()
    x = torch.randn(m, 300, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = torch.randn(40)
    ref = quant_linear(x, t, cfg, bias)  # CPU tensors: the torch decode + F.linear
    assert torch.equal(ref, F.linear(x, get_format(fmt).dequantize(t, cfg).to(dtype), bias.to(dtype)))
    y = binary_matmul_triton(x, t, cfg, bias)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    scale = ref.float().abs().max().item()
    assert y.dtype == dtype and y.shape == ref.shape
    assert (y.float() - ref.float()).abs().max().item() <= tol * scale
    # the comparison can fail: dropping the sparse list / salient columns / one group's scales changes the result
    wrong = dict(t)
    if fmt == "billm":
        wrong["scales"] = t["scales"].clone()
        wrong["scales"][:, 3] = 0  # no residual basis on the salient columns
    elif fmt == "pbllm":
        wrong["sparse_q"] = torch.zeros_like(t["sparse_q"])
    else:
        wrong["scales"] = t["scales"].clone()
        wrong["scales"][:, -1] = 0  # the shorter last group
    y_wrong = binary_matmul_triton(x, wrong, cfg, bias)
    assert (y_wrong.float() - ref.float()).abs().max().item() > 10 * tol * scale


# ---- checkpoints -------------------------------------------------------------------------------------------------

def test_bad_options_are_input_errors(tiny_model, tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text("method: ternary\noptions: {threshold: median}\n")
    r = CliRunner().invoke(app, ["quantize", str(tiny_model), "-o", str(tmp_path / "q"), "--recipe", str(rec)])
    assert r.exit_code == 2 and "threshold" in r.output
    rec.write_text("method: pbllm\noptions: {salient_ratio: 2}\n")
    r = CliRunner().invoke(app, ["quantize", str(tiny_model), "-o", str(tmp_path / "q"), "--recipe", str(rec)])
    assert r.exit_code == 2 and "salient_ratio" in r.output
    with pytest.raises(InputError, match="billm does not use bits"):  # the format fixes the bits: --bits is refused
        Recipe.from_dict({"method": "billm", "bits": 4})
