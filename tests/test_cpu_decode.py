"""The CPU forward of LlmqLinear (llmq.kernels.cpu) against the reference decode + F.linear (LLMQ_KERNELS=torch):
torch's fused int4/int8 kernels within bf16 rounding, the decoded-weight cache exactly (rotated layers, whose
transforms are folded into the cached weight, within fp32 rounding); the cache is never saved; the opt-outs work."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmq.api import quantize_
from llmq.formats.intq import IntQuantized, n_groups
from llmq.kernels import cpu
from llmq.methods.billm import billm_quantize
from llmq.methods.e8p import e8p_quantize
from llmq.methods.higgs import higgs_quantize
from llmq.methods.nf4 import nf4_quantize
from llmq.methods.pbllm import pbllm_quantize
from llmq.methods.rtn import rtn_quantize
from llmq.methods.ternary import ternary_quantize
from llmq.methods.vq import vq_quantize
from llmq.modules import LlmqLinear
from llmq.recipe import Recipe
from llmq.rotation.incoherence import LayerIncoherence

from conftest import tensors_of, toy

TOL = 1.6e-2  # fused kernels: bf16 activations and scales; relative to max |y|, about one bf16 ulp of the output
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.setenv("LLMQ_KERNELS", "auto")
    monkeypatch.delenv("LLMQ_CPU_WEIGHT_CACHE", raising=False)


def reference(mod, x, monkeypatch):
    monkeypatch.setenv("LLMQ_KERNELS", "torch")
    try:
        return mod(x)
    finally:
        monkeypatch.setenv("LLMQ_KERNELS", "auto")


def int_layer(n, k, bits, gs, sym, act_order, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = n_groups(k, gs)
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, G, generator=g) * 0.02 + 0.005).half()
    zeros = None if sym else torch.randint(0, 1 << bits, (n, G), dtype=torch.uint8, generator=g)
    g_idx = (torch.arange(k) // (gs or k))[torch.randperm(k, generator=g)].to(torch.int32) if act_order else None
    q = IntQuantized(codes, scales, zeros, bits, gs, g_idx)
    return LlmqLinear.from_packed(q.layer_config(), q.pack(), bias=torch.randn(n, generator=g))


def x_for(k, dtype, m=3, seed=1):
    return torch.randn(2, m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


FUSED = [  # n, k, bits, group, sym, act_order, kernel
    (48, 576, 4, 128, True, False, "int4"),  # 576 = 4·128 + 64: shorter last group, run at kernel group 64
    (32, 256, 4, 64, False, False, "int4"),  # asymmetric: z = s·(8 − zero)
    (32, 192, 3, 64, False, True, "int4"),  # 3-bit codes and act-order (columns sorted by group)
    (16, 128, 2, 0, True, False, "int4"),  # per-channel
    (32, 160, 4, 32, True, False, "int4"),  # kernel group 32
    (24, 112, 8, 0, True, False, "int8"),
    (24, 112, 6, 0, False, False, "int8"),  # asymmetric below 8 bits: code − zero fits an int8
]


@pytest.mark.parametrize("n,k,bits,gs,sym,act,kernel", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_int_matches_reference(monkeypatch, n, k, bits, gs, sym, act, kernel, dtype):
    mod = int_layer(n, k, bits, gs, sym, act)
    x = x_for(k, dtype)
    ref = reference(mod, x, monkeypatch)
    y = mod(x)
    fused = mod._cpu_state(dtype)
    assert isinstance(fused, cpu.FusedInt) and (fused.group is None) == (kernel == "int8")
    assert y.dtype == dtype and y.shape == ref.shape
    scale = ref.float().abs().max().item()
    assert (y.float() - ref.float()).abs().max().item() <= TOL * scale
    # the comparison can fail: flipping the last group's scales in place (the state is rebuilt) moves y well past it
    mod.scales[:, -1] *= -1
    assert (mod(x).float() - ref.float()).abs().max().item() > 5 * TOL * scale


@pytest.mark.parametrize("n,k,bits,gs,sym", [
    (40, 96, 4, 32, True),  # 40 rows: the int4 kernel needs a multiple of 16
    (32, 100, 4, 50, True),  # 100 columns: no kernel group size (32..256) divides it
    (32, 96, 8, 32, False),  # 8 bits with groups: the int8 kernel takes one scale per row
    (32, 96, 8, 0, False),  # 8-bit asymmetric: code − zero does not fit an int8
    (32, 100, 8, 0, True),  # the int8 kernel needs K a multiple of 16 (it crashes on 100)
])
def test_int_layouts_without_a_kernel_use_the_cache_exactly(monkeypatch, n, k, bits, gs, sym):
    mod = int_layer(n, k, bits, gs, sym, False)
    x = x_for(k, torch.float32)
    assert torch.equal(mod(x), reference(mod, x, monkeypatch))
    assert isinstance(mod._cpu_state(torch.float32), cpu.DenseLinear)


CACHED = {
    "nf4": lambda w, H: nf4_quantize(w, 64),
    "higgs-rotated": lambda w, H: higgs_quantize(w, 4, 64, dim=2),
    "e8p": lambda w, H: e8p_quantize(w, H, bits=2),
    "vq": lambda w, H: vq_quantize(w, H, dim=4, index_bits=6, kmeans_iters=2, update=False),
    "billm": lambda w, H: billm_quantize(w, H),
    "pbllm": lambda w, H: pbllm_quantize(w, H, group_size=64),
    "ternary": lambda w, H: ternary_quantize(w, None, group_size=64),
}


@pytest.mark.parametrize("name", CACHED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cache_equals_reference_exactly(monkeypatch, name, dtype):
    w, H = toy()
    q = CACHED[name](w, H)
    mod = LlmqLinear.from_packed(q.layer_config(), q.pack(), bias=torch.randn(32))
    x = x_for(256, dtype)
    ref = reference(mod, x, monkeypatch)
    y = mod(x)
    state = mod._cpu_state(dtype)
    assert isinstance(state, cpu.DenseLinear) and state.weight.dtype == dtype and state.weight.shape == (32, 256)
    assert torch.equal(y, ref)


def rotated_int_layer(n=64, k=128, seed=0):
    w, _ = toy(n, k, seed)
    inc = LayerIncoherence.for_layer("in", "out", k, n)
    q = rtn_quantize(inc.weight(w), 4, 64, True)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return LlmqLinear.from_packed({**q.layer_config(), **inc.layer_config()}, {**q.pack(), **inc.tensors()}, inc.bias(bias))


def test_rotated_layer_folds_its_transforms_into_the_cache(monkeypatch):
    mod = rotated_int_layer()
    x = x_for(128, torch.float32)
    ref = reference(mod, x, monkeypatch)
    y = mod(x)
    assert isinstance(mod._cpu_state(torch.float32), cpu.DenseLinear)  # no Hadamard transforms per forward
    assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    # with the cache off: the fused int4 kernel between the online transforms
    monkeypatch.setenv("LLMQ_CPU_WEIGHT_CACHE", "0")
    y = mod(x)
    assert isinstance(mod._cpu_state(torch.float32), cpu.Transformed)
    assert (y - ref).abs().max().item() <= TOL * ref.abs().max().item()
    assert (y - ref).abs().max().item() > 1e-5 * ref.abs().max().item()  # bf16 inside: not the cache's fp32 result


def test_opt_outs(monkeypatch):
    w, H = toy()
    mod = LlmqLinear.from_packed(nf4_quantize(w, 64).layer_config(), nf4_quantize(w, 64).pack())
    x = x_for(256, torch.float32)
    ref = reference(mod, x, monkeypatch)
    assert "_llmq_cpu" not in mod.__dict__  # LLMQ_KERNELS=torch: the reference, nothing built
    monkeypatch.setenv("LLMQ_CPU_WEIGHT_CACHE", "0")
    assert torch.equal(mod(x), ref) and mod._cpu_state(torch.float32) is None  # decoded per forward, nothing kept
    monkeypatch.setenv("LLMQ_CPU_WEIGHT_CACHE", "1")
    assert torch.equal(mod(x), ref) and isinstance(mod._cpu_state(torch.float32), cpu.DenseLinear)
    mod.to(torch.float32)  # .to() drops the state
    assert "_llmq_cpu" not in mod.__dict__
    xg = x.clone().requires_grad_()  # autograd: the reference path (the fused kernels have no derivative)
    mod(xg).sum().backward()
    assert xg.grad is not None and "_llmq_cpu" not in mod.__dict__


def test_fused_call_restores_the_thread_count():
    mod = int_layer(32, 256, 4, 64, True, False)
    before = torch.get_num_threads()
    mod(x_for(256, torch.float32))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("recipe", [{"bits": 4, "group_size": 64}, {"method": "nf4", "group_size": 32}])
def test_cpu_state_is_never_saved(tiny_model, tmp_path, recipe):
    m = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    quantize_(m, Recipe.from_dict(recipe), calib_ids=None)
    keys = set(m.state_dict())
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        logits = m(ids).logits
    layers = [mod for mod in m.modules() if isinstance(mod, LlmqLinear)]
    assert layers and all(mod.__dict__.get("_llmq_cpu", (None, None))[1] is not None for mod in layers)
    assert set(m.state_dict()) == keys
    m.save_pretrained(tmp_path / "saved")
    saved = tensors_of(tmp_path / "saved")
    assert set(saved) == keys or set(saved) == keys - {"lm_head.weight"}  # tied head: saved once
    assert all(saved[k].numel() == 0 for k in saved if k.endswith("_proj.weight"))  # packed layers: placeholders only
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
