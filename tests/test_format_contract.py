"""The format contract (llmq.formats.base.Format): every format is registered next to its definition and implements
it; `dequantize` is differentiable in the float tensors (scales, tables, codebooks, a layer's column scale), so
gradients reach them; every Triton kernel is registered for its format."""

import pytest
import torch

from conftest import toy
from llmq.formats import FORMATS, Format, get_format, register_format
from llmq.methods.billm import billm_quantize
from llmq.methods.e8p import e8p_quantize
from llmq.methods.higgs import higgs_quantize
from llmq.methods.nf4 import nf4_quantize
from llmq.methods.pbllm import pbllm_quantize
from llmq.methods.rtn import rtn_quantize
from llmq.methods.ternary import ternary_quantize
from llmq.methods.vq import vq_quantize


# name -> (quantizer, the float tensors gradients must reach)
CASES = {
    "int-sym": (lambda w, H: rtn_quantize(w, 4, 64, True), ["scales"]),
    "int-asym": (lambda w, H: rtn_quantize(w, 3, 64, False), ["scales"]),
    "lut-nf4": (lambda w, H: nf4_quantize(w, 64), ["scales", "table"]),
    "lut-higgs": (lambda w, H: higgs_quantize(w, 4, 64, dim=2, column_scale=True), ["scales", "table", "lut_input_scale"]),
    "e8p": (lambda w, H: e8p_quantize(w, H, bits=4), ["scales"]),
    "vq-fp16": (lambda w, H: vq_quantize(w, H, dim=4, index_bits=6, kmeans_iters=2, update=False), ["codebooks"]),
    "billm": (lambda w, H: billm_quantize(w, H), ["scales"]),
    "pbllm": (lambda w, H: pbllm_quantize(w, H, group_size=64), ["scales", "sparse_scale"]),
    "ternary": (lambda w, H: ternary_quantize(w, None, group_size=64), ["scales"]),
}


def test_every_format_is_registered_and_keeps_the_contract():
    assert sorted(FORMATS) == ["billm", "e8p", "int", "lut", "pbllm", "ternary", "vq"]
    for name, cls in FORMATS.items():
        assert issubclass(cls, Format) and cls.name == name and get_format(name) is cls
    with pytest.raises(ValueError, match="unknown llmq format"):
        get_format("nope")

    class Incomplete(Format):
        name = "incomplete"

    with pytest.raises(TypeError, match="contract"):
        register_format(Incomplete)


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_reach_the_float_tensors(case):
    quantize, names = CASES[case]
    w, H = toy()
    q = quantize(w, H)
    t, cfg = q.pack(), q.layer_config()
    ref = get_format(cfg["format"]).dequantize(t, cfg)
    leaves = {k: t[k].float().requires_grad_() for k in names}
    w2 = get_format(cfg["format"]).dequantize({**t, **leaves}, cfg)
    assert torch.equal(w2.detach(), ref)  # the same values, with a graph
    (w2 * torch.randn_like(w2)).sum().backward()
    for k, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0, k


def test_int8_codebook_scales_get_gradients():
    w, H = toy()
    q = vq_quantize(w, H, dim=4, index_bits=6, kmeans_iters=2, update=False, codebook_dtype="int8")
    t, cfg = q.pack(), q.layer_config()
    s = t["codebook_scales"].float().requires_grad_()
    get_format("vq").dequantize({**t, "codebook_scales": s}, cfg).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_every_triton_kernel_is_registered_for_its_format():
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("importing the kernels needs TRITON_INTERPRET=1 on a machine without a GPU")
    from llmq.kernels.registry import kernel_for

    for name, cls in FORMATS.items():
        assert cls.kernel("triton") is kernel_for(name) is not None, name
    assert get_format("int").kernel("torch") is not None  # the int reference rounds W to x's dtype, as the kernel does
