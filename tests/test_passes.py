"""The block loop's passes (llmq.passes): extra passes see the fp block, its calibration inputs and (on request) its
fp outputs, run in order around the quantize pass, and leave the quantization itself unchanged — in the streaming
pipeline and in `quantize_` alike."""

from __future__ import annotations

import pytest
import torch
from conftest import tensors_of
from transformers import AutoModelForCausalLM

from llmq.api import quantize_
from llmq.blocks import forward_block
from llmq.calib import CalibConfig
from llmq.passes import DEFAULT_PASSES, BlockLoop, QuantizePass
from llmq.pipeline import QuantizeJob, run_quantize
from llmq.recipe import Recipe

RECIPE = {"method": "gptq", "bits": 3, "group_size": 32}


class MeasurePass:
    """Before quantizing: the block is still fp, and `targets` are its outputs on the samples."""

    name = "measure"
    wants_targets = True

    def __init__(self):
        self.seen = []

    def run(self, work, loop):
        assert work.tensors == {} and work.rows == []  # first pass: nothing quantized yet
        assert all(type(m).__name__ != "LlmqLinear" for m in work.block.modules())
        expect = forward_block(work.block, work.calib.hidden, work.calib.position_embeddings, work.calib.batch_size)
        torch.testing.assert_close(work.targets, expect, rtol=0, atol=0)
        self.seen.append((work.index, work.prefix, tuple(work.calib.hidden.shape)))


class AfterPass:
    """After quantizing: every linear layer of the block has its packed tensors and a report row."""

    name = "after"
    wants_targets = False

    def __init__(self):
        self.layers = []

    def run(self, work, loop):
        assert work.layer_cfgs and len(work.rows) == len(work.layer_cfgs)
        assert all(any(k.startswith(layer + ".") for k in work.tensors) for layer in work.layer_cfgs)
        self.layers.append(sorted(work.layer_cfgs))


def _job(model, out, passes=DEFAULT_PASSES):
    return QuantizeJob(model=str(model), out=out, recipe=Recipe.from_dict(RECIPE),
                       calib=CalibConfig(source="c4", nsamples=4, seqlen=32), passes=passes)


def test_pipeline_runs_passes_in_order_and_quantizes_as_without_them(tiny_model, tmp_path):
    measure, after = MeasurePass(), AfterPass()
    run_quantize(_job(tiny_model, tmp_path / "plain"), log=lambda *_: None)
    run_quantize(_job(tiny_model, tmp_path / "passes", (measure, QuantizePass(), after)), log=lambda *_: None)
    assert [s[0] for s in measure.seen] == [0, 1, 2] and measure.seen[1][1] == "model.layers.1."
    assert measure.seen[0][2] == (4, 32, 96)
    assert len(after.layers) == 3 and all(len(layers) == 7 for layers in after.layers)
    plain, passes = tensors_of(tmp_path / "plain"), tensors_of(tmp_path / "passes")
    assert plain.keys() == passes.keys()
    for k in plain:
        assert torch.equal(plain[k], passes[k]), k


def test_quantize_in_memory_runs_the_same_passes(tiny_model):
    ids = torch.randint(3, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    a = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    measure = MeasurePass()
    quantize_(a, Recipe.from_dict(RECIPE), calib_ids=ids)
    quantize_(b, Recipe.from_dict(RECIPE), calib_ids=ids, passes=(measure, QuantizePass()))
    assert [s[0] for s in measure.seen] == [0, 1, 2]
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_the_loop_needs_a_quantize_pass(tiny_model):
    with pytest.raises(ValueError, match="quantize pass"):
        BlockLoop(None, Recipe(), torch.float32, passes=(MeasurePass(),))
