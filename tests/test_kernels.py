"""Triton dequant-matmul kernels under the interpreter (CPU) against the torch reference, and the reference
against a float64 product built straight from the unpacked codes.

TRITON_INTERPRET must be set before triton is imported; shapes are tiny because the interpreter is ~100x
slower than torch. N and K are never multiples of the tiles (masks), group sizes include ones that do not
divide K (shorter last group), per-channel, and one larger than K.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from llmq.formats.intq import IntQuantized, n_groups  # noqa: E402
from llmq.kernels.reference import dequantize_int, int_matmul_ref  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set", allow_module_level=True)

from llmq.kernels.intq_triton import int_matmul_triton  # noqa: E402


def make_layer(n, k, bits, gs, sym, act_order, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = n_groups(k, gs)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, G, generator=g) * 0.02 + 0.005).half()
    zeros = None if sym else torch.randint(0, 1 << bits, (n, G), dtype=torch.uint8, generator=g)
    g_idx = None
    if act_order:  # static groups visited in a permuted column order, as GPTQ act-order stores them
        g_idx = (torch.arange(k) // (gs or k))[torch.randperm(k, generator=g)].to(torch.int32)
    return IntQuantized(codes, scales, zeros, bits, gs, g_idx)


def dense_f64(q: IntQuantized) -> torch.Tensor:
    k = q.codes.shape[1]
    gi = q.g_idx.long() if q.g_idx is not None else torch.arange(k) // (q.group_size or k)
    z = q.zeros.double()[:, gi] if q.zeros is not None else 2.0 ** (q.bits - 1)
    return (q.codes.double() - z) * q.scales.double()[:, gi]


TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # relative to max |y|: about one ulp of the output dtype

CASES = [
    # M, N, K, bits, group, sym, act_order, dtype      (M=1: GEMV; 2..16: decode dot; >16: prefill GEMM)
    (1, 40, 200, 4, 64, True, False, torch.float16),  # 200 = 3·64 + 8: shorter last group; tile == group
    (3, 40, 200, 3, 64, False, True, torch.float16),  # 3-bit codes straddle words; act-order; asym
    (20, 33, 130, 8, 32, False, False, torch.float16),  # prefill, groups smaller than the K tile
    (1, 33, 96, 2, 0, True, False, torch.bfloat16),  # per-channel
    (5, 33, 96, 2, 48, True, False, torch.bfloat16),
    (20, 24, 100, 3, 128, True, False, torch.bfloat16),  # group larger than K = one group
    (17, 19, 72, 4, 32, False, True, torch.bfloat16),  # prefill + act-order + asym
    (2, 48, 136, 4, 128, False, False, torch.float16),  # 136 = 128 + 8
]


@pytest.mark.parametrize("m,n,k,bits,gs,sym,act,dtype", CASES)
def test_triton_matches_reference(m, n, k, bits, gs, sym, act, dtype):
    q = make_layer(n, k, bits, gs, sym, act)
    t, cfg = q.pack(), q.layer_config()
    assert torch.equal(dequantize_int(t, cfg).double(), dense_f64(q))  # the reference decodes the codes exactly
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = int_matmul_ref(x, t, cfg)
    y = int_matmul_triton(x, t, cfg)
    assert y.dtype == dtype and y.shape == (m, n)
    scale = ref.float().abs().max().item()
    err = (y.float() - ref.float()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"max err {err:.3e} vs max |y| {scale:.3e}"
    # ...and the reference is the float64 product to within the activation dtype's rounding
    exact = x.double() @ dense_f64(q).T
    assert (ref.double() - exact).abs().max().item() <= 2 * TOL[dtype] * exact.abs().max().item()
    if act:  # the comparison can fail: ignoring the group index gives a clearly different result
        wrong = dict(t)
        del wrong["g_idx"]
        y_wrong = int_matmul_ref(x, wrong, {**cfg, "act_order": False})
        assert (y_wrong.float() - ref.float()).abs().max().item() > 10 * TOL[dtype] * scale


def test_split_k_prefill_bias_and_leading_dims():
    q = make_layer(24, 150, 4, 64, True, False, seed=3)
    t, cfg = q.pack(), q.layer_config()
    x = torch.randn(2, 9, 150, generator=torch.Generator().manual_seed(2)).half()
    bias = torch.randn(24)
    ref = int_matmul_ref(x, t, cfg, bias)
    y = int_matmul_triton(x, t, cfg, bias, config={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 3})
    assert y.shape == (2, 9, 24)
    assert (y.float() - ref.float()).abs().max().item() <= TOL[torch.float16] * ref.float().abs().max().item()


def test_llmq_linear_dispatch(monkeypatch):
    """LlmqLinear.forward goes through the dispatcher: torch on CPU by default, Triton when forced."""
    from llmq.modules import LlmqLinear

    q = make_layer(40, 200, 4, 64, True, False, seed=5)
    mod = LlmqLinear.from_packed(q.layer_config(), q.pack())
    x = torch.randn(1, 3, 200).half()
    expect = torch.nn.functional.linear(x, q.dequantize().half())
    monkeypatch.setenv("LLMQ_KERNELS", "torch")
    assert torch.equal(mod(x), expect)
    from conftest import spy_kernel

    calls = spy_kernel(monkeypatch, "int")
    monkeypatch.setenv("LLMQ_KERNELS", "triton")
    y = mod(x)
    assert calls and (y.float() - expect.float()).abs().max().item() <= TOL[torch.float16] * expect.float().abs().max().item()


def _sylvester(p):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@pytest.mark.parametrize("m,p,dtype,inverse", [(1, 64, torch.float32, False), (12, 8, torch.float16, False),
                                               (12, 8, torch.bfloat16, True), (36, 16, torch.float32, True), (20, 1, torch.float32, False)])
def test_hadamard_kernel_matches_dense_transform(m, p, dtype, inverse):
    """Fused signs + FWHT + H_m + scale against the dense (H_m ⊗ H_p)/√n in float64. Any ±1 H_m exercises the
    kernel (it does not rely on orthogonality), so a random one is used."""
    import math

    from llmq.kernels.hadamard import hadamard_ref, hadamard_triton

    g = torch.Generator().manual_seed(m * 100 + p)
    n = m * p
    hm = None if m == 1 else (torch.randint(0, 2, (m, m), generator=g) * 2 - 1).float()
    s = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float()
    x = torch.randn(2, 3, n, generator=g).to(dtype)
    t = torch.kron(hm.double() if hm is not None else torch.ones(1, 1, dtype=torch.float64), _sylvester(p)) / math.sqrt(n)
    exact = (x.double() * s.double()) @ t.T if not inverse else (x.double() @ t) * s.double()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * exact.abs().max().item()
    for y in (hadamard_ref(x, hm, s, inverse), hadamard_triton(x, hm, s, inverse)):
        assert y.dtype == dtype and y.shape == x.shape
        assert (y.double() - exact).abs().max().item() <= tol


def test_kernel_compiles_for_sm90_without_a_gpu():
    """The interpreter accepts things the GPU compiler rejects; compile a few variants to sm_90 cubin (ptxas ships
    with triton) in a process without TRITON_INTERPRET."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "llmq.kernels.compile_check", "--arch", "90"], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # every kernel variant listed next to its kernel, every kernel present
    counts = {name: r.stdout.count(f"ok sm_90 {name} ") for name in ("int", "lut", "e8p", "vq", "billm", "pbllm", "ternary", "hadamard")}
    assert counts == {"int": 4, "lut": 5, "e8p": 4, "vq": 4, "billm": 2, "pbllm": 2, "ternary": 2, "hadamard": 4}, r.stdout
