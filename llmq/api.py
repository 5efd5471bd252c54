"""In-memory entry point: `quantize_(model, recipe, calib_ids)` quantizes a loaded transformers model in
place (its linear layers become `LlmqLinear`), with the same per-block code as the streaming pipeline.
`model.save_pretrained(dir)` then writes an llmq checkpoint."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .adapters import adapter_for
from .blocks import cast_dense_params, forward_block
from .calib import calib_batch_size, resolve_calib_dtype
from .formats import FORMAT_VERSION
from .hf import LlmqConfig, LlmqHfQuantizer
from .modules import LlmqLinear, set_submodule
from .quantize_block import Calibration, install_quantized, quantize_block, quantize_head
from .recipe import METHOD_NONE, Recipe
from .rotation import check_sizes, residual_rotation, rotate_model_


@torch.no_grad()
def quantize_(model, recipe: Recipe | None = None, calib_ids: torch.Tensor | None = None, batch_size: int | None = None,
              calib_dtype: str = "auto") -> list[dict]:
    """Quantize `model` in place; returns the per-layer report rows. `calib_dtype`: the dtype the calibration
    samples run through the blocks in (llmq.calib.resolve_calib_dtype; the same default as `llmq quantize`)."""
    recipe = (recipe or Recipe()).validate()
    adapter = adapter_for(model.config)
    check_sizes(recipe, model.config, quantize_head=recipe.spec_for(adapter.head).method != METHOD_NONE)
    rot = residual_rotation(recipe, model.config)
    if rot is not None:  # model-level rotation first: the blocks are then quantized in the rotated basis
        rotate_model_(model, rot, adapter)
    blocks = model.get_submodule(adapter.blocks)
    rotary = model.get_submodule(adapter.blocks.rsplit(".", 1)[0] + ".rotary_emb")
    hidden = pos_emb = None
    cdtype = resolve_calib_dtype(calib_dtype)
    if calib_ids is not None:
        hidden = F.embedding(calib_ids, model.get_submodule(adapter.embed).weight.float()).to(cdtype)
        seqlen = calib_ids.shape[1]
        batch_size = calib_batch_size(batch_size, seqlen)
        pos_emb = rotary(torch.zeros(1, seqlen, 1, dtype=cdtype), torch.arange(seqlen).unsqueeze(0))
    dtype = next(model.parameters()).dtype
    layers, rows = {}, []
    for i, block in enumerate(blocks):
        prefix = adapter.block_prefix(i)
        calib = Calibration(hidden, pos_emb, batch_size) if hidden is not None else None
        tensors, cfgs, block_rows = quantize_block(block, prefix, adapter, recipe, dtype, calib)
        install_quantized(block, prefix, tensors, cfgs)
        if calib is not None and calib.output is not None:
            hidden = calib.output  # a staged (true-sequential) pass already ran the samples through it
        elif hidden is not None:  # through a calibration-dtype copy: the model's own block keeps its dtype
            runner = block if cdtype == torch.float32 else cast_dense_params(copy.deepcopy(block), cdtype)
            hidden = forward_block(runner, hidden, pos_emb, batch_size)
        layers.update(cfgs)
        rows.extend(block_rows)
    head_spec = recipe.spec_for(adapter.head)
    if head_spec.method != METHOD_NONE:
        packed, cfg = quantize_head(model.get_submodule(adapter.head).weight, head_spec, recipe, adapter.head)
        packed.pop("weight")
        set_submodule(model, adapter.head, LlmqLinear.from_packed(cfg, packed))
        layers[adapter.head] = cfg
        model.config.tie_word_embeddings = False
    qc = LlmqConfig(format_version=FORMAT_VERSION, layers=layers, recipe=recipe.to_dict())
    model.config.quantization_config = qc
    model.hf_quantizer = LlmqHfQuantizer(qc)
    return rows
