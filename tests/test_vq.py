"""Learned vector codebooks (--method vq, format vq): exact packing, the k-means / feedback / codebook-update steps each
doing what they claim on a layer with a correlated Hessian, exact bits per weight, the Triton kernel against the torch
decode under the interpreter, and checkpoints that reload in transformers with identical logits."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llmq.errors import InputError  # noqa: E402
from llmq.formats import get_format  # noqa: E402
from llmq.formats.vq import pack_codes, unpack_codes, vq_bits  # noqa: E402
from llmq.methods.feedback import hessian_factor  # noqa: E402
from llmq.methods.vq import (assign_feedback, decode, kmeans_inputs, layer_options, nearest_codes, proxy_loss,  # noqa: E402
                             update_codebooks, vq_quantize, weighted_kmeans)
from llmq.modules import layer_tensor_specs  # noqa: E402
from llmq.quantize_block import packed_bits_per_weight  # noqa: E402
from llmq.recipe import Recipe  # noqa: E402


def toy_layer(n=48, k=96, seed=0):
    """A random layer and a strongly correlated Hessian with uneven channel scales (like a real layer's inputs)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[torch.rand(n, k, generator=g) < 0.01] *= 5
    mix = torch.eye(k) + 0.4 * torch.randn(k, k, generator=g)
    x = (torch.randn(512, k, generator=g) @ mix) * (1 + 3 * torch.rand(k, generator=g))
    return w, 2 * x.T @ x / 512


# ---- packing -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8, 9, 11, 12, 16])
@pytest.mark.parametrize("n", [1, 5, 33, 144])
def test_index_packing_round_trips_exactly(bits, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    c = torch.randint(0, 1 << bits, (7, n), generator=g)
    c[0] = (1 << bits) - 1  # all ones: the sign bit of a word must not leak
    p = pack_codes(c, bits)
    assert p.dtype == torch.int32 and p.shape == (7, -(-n * bits // 32))
    assert torch.equal(unpack_codes(p, bits, n), c)


@pytest.mark.parametrize("dim,kbits,rpc,dtype", [(4, 8, 0, "fp16"), (2, 6, 20, "int8"), (8, 12, 7, "fp16"), (2, 3, 0, "int8")])
def test_packed_layer_decodes_to_its_codebooks(dim, kbits, rpc, dtype):
    w, H = toy_layer()
    q = vq_quantize(w, H, dim=dim, index_bits=kbits, rows_per_codebook=rpc, codebook_dtype=dtype, kmeans_iters=3)
    t, cfg = q.pack(), q.layer_config()
    specs = layer_tensor_specs(cfg)  # what a loader allocates from the config alone
    assert set(specs) == set(t) and all(tuple(t[k].shape) == specs[k][0] and t[k].dtype == specs[k][1] for k in t)
    assert cfg["bits"] == kbits / dim and ("codebook_scales" in t) == (dtype == "int8")
    W = get_format("vq").dequantize(t, cfg)
    r = rpc or 48
    C = t["codebooks"].double() * (t["codebook_scales"].double()[:, None, None] if dtype == "int8" else 1)
    exp = torch.stack([torch.cat([C[n // r, int(q.codes[n, j])] for j in range(96 // dim)]) for n in range(48)])
    assert torch.equal(W.double(), exp)
    assert torch.equal(W, decode(q.codebooks, q.codes, q.rows_per_codebook))
    from safetensors.torch import load, save

    back = load(save(t))
    assert all(torch.equal(back[k], t[k]) for k in t)


def test_bits_per_weight_accounting_is_exact():
    w, H = toy_layer()
    for dim, kbits, rpc, dtype in [(4, 8, 0, "fp16"), (2, 6, 20, "int8"), (2, 5, 0, "fp16")]:
        q = vq_quantize(w, H, dim=dim, index_bits=kbits, rows_per_codebook=rpc, codebook_dtype=dtype, kmeans_iters=2)
        bits = vq_bits(48, 96, dim, kbits, rpc, dtype)
        assert packed_bits_per_weight(q.pack(), q.layer_config()) == bits / (48 * 96)
        nb = -(-48 // (rpc or 48))
        codebook = nb * (1 << kbits) * dim * (16 if dtype == "fp16" else 8) + (16 * nb if dtype == "int8" else 0)
        assert bits == 48 * 32 * -(-(96 // dim) * kbits // 32) + codebook


def test_bad_shapes_and_options_are_input_errors():
    w, H = toy_layer(k=90)
    with pytest.raises(InputError, match="multiple of the vector dimension 4"):
        vq_quantize(w, H, dim=4)
    with pytest.raises(InputError, match="at most 16"):
        layer_options(3, {"dim": 8})
    assert layer_options(2, {}) == {"dim": 4, "index_bits": 8} and layer_options(3, {}) == {"dim": 2, "index_bits": 6}
    assert layer_options(2, {"dim": 8, "index_bits": 12})["index_bits"] == 12
    with pytest.raises(InputError, match="dim"):
        Recipe.from_dict({"method": "vq", "options": {"dim": 3}}).validate()
    with pytest.raises(InputError, match="codebook_dtype"):
        Recipe.from_dict({"method": "vq", "options": {"codebook_dtype": "fp8"}}).validate()


# ---- the algorithm -------------------------------------------------------------------------------------------------

def test_weighted_kmeans_objective_decreases_monotonically_and_is_seeded():
    w, H = toy_layer(n=64, k=128)
    X, Hw = kmeans_inputs(w, torch.diagonal(H), 4, 16)  # 4 codebooks of 16 rows
    trace = []
    C, a = weighted_kmeans(X, Hw, 32, iters=30, seed=3, tol=0.0, trace=trace)
    assert len(trace) > 6
    assert all(b <= a_ * (1 + 1e-6) for a_, b in zip(trace, trace[1:])), trace
    assert trace[-1] < 0.8 * trace[0]  # Lloyd really improves on the seeding
    C2, a2 = weighted_kmeans(X, Hw, 32, iters=30, seed=3, tol=0.0)
    assert torch.equal(C, C2) and torch.equal(a, a2)  # deterministic for a seed
    C3, _ = weighted_kmeans(X, Hw, 32, iters=30, seed=4, tol=0.0)
    assert not torch.equal(C, C3)
    # the weights matter: centroids weighted by diag(H) differ from unweighted ones
    C4, _ = weighted_kmeans(X, torch.ones_like(Hw), 32, iters=30, seed=3, tol=0.0)
    assert not torch.allclose(C, C4)


def test_error_feedback_assignment_beats_nearest_centroid():
    w, H = toy_layer()
    X, Hw = kmeans_inputs(w, torch.diagonal(H), 4, 0)
    C, _ = weighted_kmeans(X, Hw, 64, iters=10)
    _, _, U, _ = hessian_factor(H, 96)
    fb = assign_feedback(w, U, C, 0)
    near = torch.stack([nearest_codes(w[:, j:j + 4], C, None, 0) for j in range(0, 96, 4)], 1)
    assert torch.equal(assign_feedback(w, None, C, 0), near)  # no Hessian: plain nearest centroid
    l_fb, l_near = proxy_loss(w, decode(C, fb, 0), H), proxy_loss(w, decode(C, near, 0), H)
    assert l_fb < 0.8 * l_near, (l_fb, l_near)
    # the same with blocks of rows sharing codebooks and lazy blocks smaller than the layer
    X, Hw = kmeans_inputs(w, torch.diagonal(H), 2, 20)
    C, _ = weighted_kmeans(X, Hw, 16, iters=10)
    fb = assign_feedback(w, U, C, 20, block_size=32)
    near = torch.stack([nearest_codes(w[:, j:j + 2], C, None, 20) for j in range(0, 96, 2)], 1)
    assert proxy_loss(w, decode(C, fb, 20), H) < 0.8 * proxy_loss(w, decode(C, near, 20), H)


def test_codebook_update_solves_the_least_squares_problem():
    w, H = toy_layer(n=24, k=32)
    X, Hw = kmeans_inputs(w, torch.diagonal(H), 2, 10)
    C, _ = weighted_kmeans(X, Hw, 8, iters=5)
    _, _, U, _ = hessian_factor(H, 32)
    codes = assign_feedback(w, U, C, 10)
    new = update_codebooks(w, H, codes, C, 10, iters=200)
    before, after = proxy_loss(w, decode(C, codes, 10), H), proxy_loss(w, decode(new, codes, 10), H)
    assert after < 0.9 * before
    # the exact minimiser from dense normal equations: Q = S θ, θ = (Σ_r S_rᵀ H S_r)⁺ Σ_r S_rᵀ H w_r
    nb, nc, d = C.shape
    S = torch.zeros(24, 32, nb * nc * d, dtype=torch.float64)
    for r in range(24):
        for j in range(16):
            for t in range(d):
                S[r, j * d + t, ((r // 10) * nc + int(codes[r, j])) * d + t] = 1
    Hd = H.double()
    G = torch.einsum("rka,kl,rlb->ab", S, Hd, S)
    b = torch.einsum("rka,kl,rl->a", S, Hd, w.double())
    theta = torch.linalg.lstsq(G, b).solution.reshape(nb, nc, d)
    assert after == pytest.approx(proxy_loss(w, decode(theta.float(), codes, 10), H), rel=1e-4)
    # CG from the current centroids never increases the objective, whatever the iteration count
    losses = [proxy_loss(w, decode(update_codebooks(w, H, codes, C, 10, iters=i), codes, 10), H) for i in range(6)]
    assert all(b_ <= a_ * (1 + 1e-6) for a_, b_ in zip(losses, losses[1:])), losses


def test_full_method_update_step_does_not_increase_loss():
    w, H = toy_layer()
    for dtype in ("fp16", "int8"):
        kw = dict(dim=4, index_bits=6, rows_per_codebook=16, codebook_dtype=dtype, kmeans_iters=5)
        off, on = vq_quantize(w, H, update=False, **kw), vq_quantize(w, H, **kw)
        assert torch.equal(on.codes, off.codes)
        assert proxy_loss(w, on.dequantize(), H) < proxy_loss(w, off.dequantize(), H)
    plain = vq_quantize(w, H, feedback=False, **kw)
    assert proxy_loss(w, on.dequantize(), H) < proxy_loss(w, plain.dequantize(), H)


# ---- kernel --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim,kbits,rpc,dtype", [(4, 8, 0, "fp16"), (2, 6, 20, "int8"), (8, 12, 0, "fp16"), (2, 3, 7, "fp16")])
@pytest.mark.parametrize("m,xdtype", [(1, torch.float16), (5, torch.float32), (20, torch.bfloat16), (3, torch.float16)])
def test_vq_kernel_matches_reference(dim, kbits, rpc, dtype, m, xdtype):
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set")
    from llmq.kernels.dispatch import quant_linear
    from llmq.kernels.vq_triton import vq_matmul_triton

    w, H = toy_layer()
    q = vq_quantize(w, H, dim=dim, index_bits=kbits, rows_per_codebook=rpc, codebook_dtype=dtype, kmeans_iters=2)
    t, cfg = q.pack(), q.layer_config()
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(m)).to(xdtype)
    bias = torch.randn(48)
    ref = quant_linear(x, t, cfg, bias)  # CPU tensors: the torch decode + F.linear
    assert torch.equal(ref, F.linear(x, get_format("vq").dequantize(t, cfg).to(xdtype), bias.to(xdtype)))
    y = vq_matmul_triton(x, t, cfg, bias)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[xdtype]
    scale = ref.float().abs().max().item()
    assert y.dtype == xdtype and y.shape == ref.shape
    assert (y.float() - ref.float()).abs().max().item() <= tol * scale
    wrong = dict(t)  # the comparison can fail: one flipped index bit changes the result
    wrong["qweight"] = t["qweight"].clone()
    wrong["qweight"][:, 0] ^= 1 << 1
    assert (vq_matmul_triton(x, wrong, cfg, bias).float() - ref.float()).abs().max().item() > 10 * tol * scale


# ---- checkpoints ---------------------------------------------------------------------------------------------------
