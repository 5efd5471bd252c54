"""Lookup-table methods (nf4, any4, higgs) and their "lut" format: the NF4 table against the published values, the
Gaussian grids' optimality conditions, exact pack/unpack round trips, any4's activation weighting, the Triton
decode-matmul under the interpreter, and checkpoints that reload in transformers with identical logits."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from llmq.cli import app  # noqa: E402
from llmq.formats import get_format  # noqa: E402
from llmq.formats.lut import LutFormat  # noqa: E402
from llmq.formats.packing import unpack_bits  # noqa: E402
from llmq.methods.any4 import any4_quantize, weighted_error  # noqa: E402
from llmq.methods.grids import gaussian_grid, gaussian_mse_1d, lloyd_max_1d, nearest_2d, nf4_table  # noqa: E402
from llmq.methods.higgs import higgs_quantize  # noqa: E402
from llmq.methods.nf4 import nf4_quantize  # noqa: E402
from llmq.methods.rtn import rtn_quantize  # noqa: E402
from llmq.modules import layer_tensor_specs  # noqa: E402
from llmq.quantize_block import packed_bits_per_weight  # noqa: E402

# bitsandbytes' NF4 table (QLoRA appendix E), float32 values as published
NF4_PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def toy_layer(n=40, k=300, seed=0, outliers=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if outliers:
        w[torch.rand(n, k, generator=g) < 0.01] *= 6
    x = torch.randn(256, k, generator=g) * (0.2 + 4 * torch.rand(k, generator=g) ** 3)  # very uneven input channels
    return w, 2 * x.T @ x / 256


# ---- grids ---------------------------------------------------------------------------------------------------------

def test_nf4_table_matches_the_published_values():
    t = nf4_table()
    assert t.shape == (16,) and t[7] == 0 and t[0] == -1 and t[-1] == 1
    assert int((t > 0).sum()) == 8 and int((t < 0).sum()) == 7
    assert torch.allclose(t, torch.tensor(NF4_PUBLISHED, dtype=torch.float64), atol=2e-7, rtol=0)


def _integrate(f, a, b, n=200001):
    x = torch.linspace(a, b, n, dtype=torch.float64)
    return torch.trapezoid(f(x), x)


@pytest.mark.parametrize("bits,known", [(1, 0.3634), (2, 0.1175), (3, 0.03455), (4, 0.009501)])
def test_lloyd_max_grids_are_optimal_for_the_normal(bits, known):
    lv = lloyd_max_1d(bits)
    assert lv.shape == (1 << bits,) and torch.all(lv[1:] > lv[:-1]) and torch.allclose(lv, -lv.flip(0))
    pdf = lambda x: torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    edges = [-12.0] + ((lv[1:] + lv[:-1]) / 2).tolist() + [12.0]  # nearest-neighbour cells: midpoint thresholds
    for i in range(len(lv)):  # centroid condition, checked by independent numerical integration
        mass = _integrate(pdf, edges[i], edges[i + 1])
        mean = _integrate(lambda x: x * pdf(x), edges[i], edges[i + 1]) / mass
        assert abs(float(mean) - float(lv[i])) < 1e-6
    mse = gaussian_mse_1d(lv)
    mse_num = sum(float(_integrate(lambda x: (x - lv[i]) ** 2 * pdf(x), edges[i], edges[i + 1])) for i in range(len(lv)))
    assert mse == pytest.approx(mse_num, rel=1e-6) and mse == pytest.approx(known, rel=2e-3)
    # better than the best uniform grid with as many levels (step searched finely); with 2 levels they coincide
    n = 1 << bits
    best_uniform = min(gaussian_mse_1d((torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * s)
                       for s in torch.linspace(0.05, 2.0, 400).tolist())
    assert mse < best_uniform * 0.999 if bits > 1 else mse <= best_uniform * (1 + 1e-9)
    # and perturbing any level makes it worse (a local optimum, not just a fixed point)
    for i in range(n):
        for eps in (1e-3, -1e-3):
            p = lv.clone()
            p[i] += eps
            assert gaussian_mse_1d(p) > mse


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_2d_grids_satisfy_lloyd_conditions_and_beat_the_1d_grid(bits):
    grid = gaussian_grid(bits, 2).double()
    assert grid.shape == (1 << (2 * bits), 2) and torch.unique(grid, dim=0).shape[0] == grid.shape[0]
    x = torch.randn(1 << 19, 2, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)  # a fresh sample
    a = nearest_2d(x, grid)
    sub = x[:4096]
    assert torch.equal(a[:4096], torch.cdist(sub, grid).argmin(1))  # nearest-neighbour search is exact
    cnt = torch.bincount(a, minlength=grid.shape[0]).double()
    assert int((cnt == 0).sum()) == 0
    cent = torch.zeros_like(grid).index_add_(0, a, x) / cnt[:, None]
    var = torch.zeros(grid.shape[0], dtype=torch.float64).index_add_(0, a, ((x - grid[a]) ** 2).sum(1)) / cnt
    se = (var / cnt).sqrt()  # sampling error of each cell's mean
    assert float(((cent - grid).norm(dim=1) / se).max()) < 6  # centroid condition, to sampling accuracy
    mse2 = float(((x - grid[a]) ** 2).sum(1).mean()) / 2
    mse1 = gaussian_mse_1d(lloyd_max_1d(bits))  # the product of two optimal 1-d grids, same bits per weight
    assert mse2 < 0.97 * mse1, (mse2, mse1)


# ---- format: round trips and bits per weight -------------------------------------------------------------------------

QUANTIZERS = {
    "nf4-g64": lambda w, H: nf4_quantize(w, 64),  # 300 = 4·64 + 44: shorter last group
    "nf4-pc": lambda w, H: nf4_quantize(w, 0),
    "any4-g96": lambda w, H: any4_quantize(w, H, 96),
    "any4-pc-nocalib": lambda w, H: any4_quantize(w, None, 0),
    "higgs4-d1": lambda w, H: higgs_quantize(w, 4, 64),
    "higgs3-d1-mse": lambda w, H: higgs_quantize(w, 3, 128, scale="mse"),
    "higgs2-d1-norot": lambda w, H: higgs_quantize(w, 2, 64, rotate=False),
    "higgs4-d2": lambda w, H: higgs_quantize(w, 4, 64, dim=2),
    "higgs3-d2": lambda w, H: higgs_quantize(w, 3, 64, dim=2),  # 6-bit codes straddle words
    "higgs2-d2": lambda w, H: higgs_quantize(w, 2, 128, dim=2),
    "higgs3-d2-norot": lambda w, H: higgs_quantize(w, 3, 64, dim=2, rotate=False),  # odd K: the last pair is half padding
    "higgs4-d2-h60": lambda w, H: higgs_quantize(w, 4, 64, dim=2, hadamard_size=60),  # blocks of 60: 300 = 5·60
    "higgs4-d2-cs": lambda w, H: higgs_quantize(w, 4, 64, dim=2, column_scale=True),
    "higgs3-d1-cs-norot": lambda w, H: higgs_quantize(w, 3, 64, rotate=False, column_scale=True),
}
ROTATED = {name for name in QUANTIZERS if name.startswith("higgs") and "norot" not in name}


def hand_decode(q, k):
    """The weight from the unpacked fields, by explicit loops over the documented layout (float64)."""
    n = q.codes.shape[0]
    g = q.group_size or k
    tab = q.table.double()
    w = torch.zeros(n, k, dtype=torch.float64)
    for j in range(k):
        c = q.codes[:, j // q.dim].long()
        v = tab[torch.arange(n), c] if q.table_kind == "row" else tab[c, j % q.dim]
        w[:, j] = v * q.scales[:, j // g].double()
    return w


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
@pytest.mark.parametrize("k", [300, 301])
def test_packed_layer_round_trips_exactly(name, k):
    if name in ROTATED and k % 2:
        pytest.skip("an odd size has no Hadamard matrix")  # (nor do 301's divisors)
    w, H = toy_layer(k=k)
    q = QUANTIZERS[name](w, H)
    t, cfg = q.pack(), q.layer_config()
    assert cfg["format"] == "lut"
    specs = layer_tensor_specs(cfg)
    assert set(specs) == set(t) and all(tuple(t[x].shape) == specs[x][0] and t[x].dtype == specs[x][1] for x in t)
    cb = cfg["bits"] * cfg["dim"]
    assert torch.equal(unpack_bits(t["qweight"], cb, q.codes.shape[1]).long(), q.codes.long())  # codes round trip
    decode_rotated = LutFormat.decode  # W̃, before the layer's fused input transforms
    assert torch.equal(decode_rotated(t, cfg).double(), hand_decode(q, k))
    W = get_format("lut").dequantize(t, cfg)
    kinds = [(e["kind"], e.get("fused"), e.get("block")) for e in cfg.get("input_transforms", [])]
    assert (("channel_scale", True, None) in kinds) == (q.input_scale is not None)
    c = q.input_scale.float() if q.input_scale is not None else torch.ones(k)
    if q.signs is not None:  # the decoded weight is in the original basis: rotating it back gives the grid values
        from llmq.rotation.hadamard import input_hadamard

        V = input_hadamard(q.signs, q.hadamard_block)
        assert torch.allclose(V.forward(W / c), decode_rotated(t, cfg), atol=1e-6)
        assert kinds[-1] == ("hadamard", True, q.hadamard_block)
    else:
        assert torch.allclose(W, decode_rotated(t, cfg) * c, atol=0, rtol=1e-6)
    rel = float(((W - w) ** 2).sum() / (w ** 2).sum())
    assert rel < {2: 0.3, 3: 0.1, 4: 0.05}[cfg["bits"]], rel  # sanity bounds (per-channel and unrotated cases are the worst)
    # bits per weight: codes, scales, table and signs, nothing left out
    n = w.shape[0]
    G = -(-k // (q.group_size or k))
    T = 1 << cb
    expect = n * (-(-(-(-k // cfg["dim"])) * cb // 32)) * 32 + 16 * n * G
    expect += 16 * (n * T if cfg["table"] == "row" else T * cfg["dim"])
    expect += 32 * (-(-k // 32)) if q.signs is not None else 0
    expect += 16 * k if q.input_scale is not None else 0
    assert packed_bits_per_weight(t, cfg) == pytest.approx(expect / (n * k))


def test_any4_weighted_error_beats_nf4_with_uneven_activations():
    w, H = toy_layer(n=64, k=256, seed=3)
    h = torch.diagonal(H) / 2
    nf4 = nf4_quantize(w, 128).dequantize()
    weighted = any4_quantize(w, H, 128).dequantize()
    plain = any4_quantize(w, None, 128).dequantize()
    e_nf4, e_w, e_plain = (weighted_error(w, q, h) for q in (nf4, weighted, plain))
    assert e_w < 0.85 * e_nf4, (e_w, e_nf4)
    assert e_w < 0.95 * e_plain  # the activation statistics steer the table: better on the objective that matters
    assert weighted_error(w, plain, None) <= weighted_error(w, nf4, None)  # unweighted any4 still beats NF4 on plain MSE


def test_higgs_beats_nf4_and_rtn_on_a_layer_with_outliers():
    w, _ = toy_layer(n=64, k=512, seed=4)
    err = lambda q: float(((q.dequantize() - w) ** 2).sum() / (w ** 2).sum())  # noqa: E731
    e_h = err(higgs_quantize(w, 4, 128))
    assert e_h < err(nf4_quantize(w, 128)) and e_h < err(rtn_quantize(w, 4, 128, True))
    assert err(higgs_quantize(w, 4, 128, dim=2)) < e_h  # the 2-d grid is better at the same bits
    assert err(higgs_quantize(w, 4, 128, scale="mse")) < e_h
    assert err(higgs_quantize(w, 4, 128, rotate=False)) > 2 * e_h  # the rotation is what tames the outliers


def test_higgs_column_scale_gives_each_column_an_error_in_proportion_to_its_size():
    """A layer whose few input columns hold tiny weights (as the columns that read a model's massive-activation
    channels do): the plain rotation gives them the same absolute error as every other column, so their relative
    error is huge; with column_scale their relative error is like everyone else's, at the same total error."""
    w, _ = toy_layer(n=64, k=512, seed=5)
    small = torch.tensor([3, 100, 301])
    w[:, small] *= 1e-3
    def col_rel(q):
        e = (q.dequantize() - w).square().sum(0) / w.square().sum(0)
        return e[small].mean().item(), e[torch.ones(512, dtype=torch.bool).index_fill_(0, small, False)].mean().item()
    plain, scaled = higgs_quantize(w, 4, 64, dim=2), higgs_quantize(w, 4, 64, dim=2, column_scale=True)
    (p_small, p_rest), (s_small, s_rest) = col_rel(plain), col_rel(scaled)
    assert p_small > 1000 * p_rest  # the tiny columns are swamped by the spread error
    assert s_small < 3 * s_rest and s_rest < 2 * p_rest  # same relative error everywhere, little cost elsewhere
    total = lambda q: float(((q.dequantize() - w) ** 2).sum() / (w ** 2).sum())  # noqa: E731
    assert total(scaled) < 1.5 * total(plain)
    z = w.clone(); z[:, 7] = 0  # noqa: E702  an all-zero column stays exactly zero
    assert torch.equal(higgs_quantize(z, 4, 64, column_scale=True).dequantize()[:, 7], torch.zeros(64))


# ---- kernels -----------------------------------------------------------------------------------------------------

KERNEL_CASES = ["nf4-g64", "any4-g96", "higgs4-d1", "higgs3-d2", "higgs4-d2", "higgs2-d1-norot", "higgs3-d1-mse", "nf4-pc",
                "higgs4-d2-h60", "higgs4-d2-cs", "higgs3-d1-cs-norot"]


@pytest.mark.parametrize("name", KERNEL_CASES)
@pytest.mark.parametrize("m,dtype", [(1, torch.float16), (5, torch.float32), (20, torch.bfloat16), (1, torch.bfloat16),
                                     (3, torch.float16)])
def test_lut_kernel_matches_reference(name, m, dtype):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    from llmq.kernels.dispatch import quant_linear
    from llmq.kernels.lut_triton import lut_matmul_triton

    w, H = toy_layer(n=40, k=300)
    q = QUANTIZERS[name](w, H)
    t, cfg = q.pack(), q.layer_config()
    x = torch.randn(m, 300, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = torch.randn(40)
    ref = quant_linear(x, t, cfg, bias)  # CPU: the torch decode + F.linear
    assert torch.equal(ref, F.linear(x, get_format("lut").dequantize(t, cfg).to(dtype), bias.to(dtype)))
    y = lut_matmul_triton(x, t, cfg, bias)
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    scale = ref.float().abs().max().item()
    assert y.dtype == dtype and y.shape == ref.shape
    assert (y.float() - ref.float()).abs().max().item() <= tol * scale
    wrong = dict(t)  # the comparison can fail: negating the shorter last group's scales changes the result
    wrong["scales"] = t["scales"].clone()
    wrong["scales"][:, -1] *= -1
    y_wrong = lut_matmul_triton(x, wrong, cfg, bias)
    assert (y_wrong.float() - ref.float()).abs().max().item() > 5 * tol * scale


def test_lut_kernel_through_llmq_linear_with_leading_dims(monkeypatch):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    from llmq.modules import LlmqLinear

    from conftest import spy_kernel

    w, _ = toy_layer(n=24, k=96)
    q = higgs_quantize(w, 4, 32, dim=2)
    mod = LlmqLinear.from_packed(q.layer_config(), q.pack())
    x = torch.randn(2, 3, 96).half()
    monkeypatch.setenv("LLMQ_KERNELS", "torch")
    expect = mod(x)
    calls = spy_kernel(monkeypatch, "lut")
    monkeypatch.setenv("LLMQ_KERNELS", "triton")
    y = mod(x)
    assert calls and y.shape == (2, 3, 24)
    assert (y.float() - expect.float()).abs().max().item() <= 3e-3 * expect.float().abs().max().item()


# ---- checkpoints -------------------------------------------------------------------------------------------------

def test_bad_input_is_a_one_line_error(tiny_model, tmp_path):
    run = lambda *a: CliRunner().invoke(app, ["quantize", str(tiny_model), "-o", str(tmp_path / "q"), "--calib", "none", *a])  # noqa: E731
    r = run("--method", "higgs", "--bits", "5")
    assert r.exit_code == 2 and "bits" in r.output
    rec = tmp_path / "r.yaml"
    rec.write_text("method: higgs\ngroup_size: 33\noptions: {dim: 2}\n")
    r = run("--recipe", str(rec))
    assert r.exit_code == 2 and "even group size" in r.output
    rec.write_text("method: higgs\noptions: {dim: 3}\n")
    r = run("--recipe", str(rec))
    assert r.exit_code == 2 and "dim" in r.output
    assert not (tmp_path / "q").exists()


def test_block_hadamard_is_orthogonal_and_block_diagonal():
    """HIGGS's block transform: orthogonal, inverse exact, and an input feature only mixes within its block."""
    from llmq.rotation.hadamard import BlockHadamard, random_signs

    V = BlockHadamard(random_signs(192, "t"), 64)
    M = V.matrix()
    torch.testing.assert_close(M @ M.T, torch.eye(192, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(3, 192, dtype=torch.float64)
    torch.testing.assert_close(V.forward(x), x @ M.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(V.inverse(V.forward(x)), x, rtol=0, atol=1e-12)
    e = torch.zeros(192, dtype=torch.float64)
    e[70] = 1
    assert V.forward(e)[:64].abs().max() == 0 and V.forward(e)[128:].abs().max() == 0 and V.forward(e)[64:128].abs().min() > 0
    with pytest.raises(Exception, match="hadamard_size"):
        higgs_quantize(torch.randn(4, 192), 4, 64, hadamard_size=80)
