"""A method and a format defined in this file alone (no other file of llmq changed) plug into the pipeline: a toy
method writing the existing int format, and a toy format with its own decode and the method that writes it; both
quantize through the CLI, save, and reload in transformers with the logits of the quantized weights."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import tensors_of
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from llmq.cli import app
from llmq.formats import FORMATS, Format, register_format
from llmq.formats.intq import IntQuantized
from llmq.methods import METHODS
from llmq.methods.base import Calibration, Method, register


class HalfRangeRTN(Method):
    """Round to nearest on the int format, the scale set by half the row's range (clips the outliers)."""

    name = "toy_halfrange"
    format = "int"
    bit_widths = "2-8"
    calibration = Calibration.IGNORES
    uses_fields = frozenset({"bits"})

    def quantize(self, weight, spec, hessian=None):
        half = 1 << (spec.bits - 1)
        scale = (weight.abs().amax(1, keepdim=True) / 2 / (half - 1)).clamp_min(1e-8).half()
        codes = (weight / scale.float()).round().clamp(-half, half - 1) + half
        return IntQuantized(codes.to(torch.uint8), scale, None, spec.bits, 0)


@dataclass
class SignQuantized:
    signs: torch.Tensor  # bool [out, in]
    scale: torch.Tensor  # fp16 [out]

    def layer_config(self) -> dict:
        out, inp = self.signs.shape
        return {"format": "toy_sign", "bits": 8, "group_size": 0, "sym": True, "in_features": inp, "out_features": out}

    def pack(self) -> dict:
        return {"signs": self.signs.to(torch.uint8), "scale": self.scale}

    def dequantize(self) -> torch.Tensor:
        return SignFormat.dequantize(self.pack(), self.layer_config())


class SignFormat(Format):
    """w = scale_row · (±1), one byte per sign (a toy: real formats pack)."""

    name = "toy_sign"

    @staticmethod
    def tensor_specs(cfg):
        return {"signs": ((cfg["out_features"], cfg["in_features"]), torch.uint8),
                "scale": ((cfg["out_features"],), torch.float16)}

    @staticmethod
    def decode(t, cfg):
        return (t["signs"].float() * 2 - 1) * t["scale"].float()[:, None]


class MeanSign(Method):
    name = "toy_sign"
    format = "toy_sign"
    bit_widths = "1 (stored in 8)"
    calibration = Calibration.IGNORES
    uses_fields = frozenset()

    def quantize(self, weight, spec, hessian=None):
        return SignQuantized(weight >= 0, weight.abs().mean(1).half())


@pytest.fixture
def toys():
    """Registered for this test only (every other test sees llmq's own methods and formats)."""
    register(HalfRangeRTN), register_format(SignFormat), register(MeanSign)
    yield
    METHODS.pop("toy_halfrange"), METHODS.pop("toy_sign"), FORMATS.pop("toy_sign")


def _quantize(model, out, method, *args):
    r = CliRunner().invoke(app, ["quantize", str(model), "-o", str(out), "--method", method, *args])
    assert r.exit_code == 0, r.output
    return out


def _logits_with_decoded(model_dir, decoded: dict, ids):
    """The fp model with each quantized layer's weight replaced by `decoded[layer]`: what the checkpoint must compute."""
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, w in decoded.items():
            m.get_submodule(name).weight.copy_(w)
        return m(ids).logits


def test_toy_method_and_toy_format_quantize_save_and_reload(toys, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMQ_KERNELS", "torch")  # the reference decode (the CPU int4 kernel rounds activations to bf16)
    assert "toy_halfrange" in METHODS and "toy_sign" in FORMATS
    ids = torch.arange(5, 37).unsqueeze(0)
    for method, args in (("toy_halfrange", ["--bits", "4"]), ("toy_sign", [])):
        out = _quantize(tiny_model, tmp_path / method, method, *args)
        q = AutoModelForCausalLM.from_pretrained(out)
        layers = q.config.quantization_config.layers
        assert len(layers) == 21 and {c["method"] for c in layers.values()} == {method}
        fmt = FORMATS[METHODS[method].format]
        t = tensors_of(out)
        decoded = {n: fmt.dequantize({k: t[f"{n}.{k}"] for k in fmt.tensor_specs(c)}, c) for n, c in layers.items()}
        with torch.no_grad():
            got = q(ids).logits
        torch.testing.assert_close(got, _logits_with_decoded(tiny_model, decoded, ids), rtol=1e-4, atol=1e-4)
        w = decoded["model.layers.0.mlp.down_proj"]
        assert (w.abs() > 0).all() if method == "toy_sign" else w.unique().numel() > 2
    # the toy sign layer really computes with its decode (not with a dense copy of the original weight)
    lin = AutoModelForCausalLM.from_pretrained(tmp_path / "toy_sign").model.layers[0].mlp.down_proj
    x = torch.randn(2, lin.in_features)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, SignFormat.dequantize(dict(lin.named_buffers()), lin.layer_config)))
