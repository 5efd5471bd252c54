"""In-memory entry point: `quantize_(model, recipe, calib_ids)` quantizes a loaded transformers model in
place (its linear layers become `LlmqLinear`), with the same per-block code as the streaming pipeline.
`model.save_pretrained(dir)` then writes an llmq checkpoint."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapters import adapter_for
from .calib import calib_batch_size, resolve_calib_dtype
from .formats import FORMAT_VERSION
from .hf import LlmqConfig, LlmqHfQuantizer
from .modules import LlmqLinear, set_submodule
from .passes import DEFAULT_PASSES, BlockLoop
from .quantize_block import install_quantized, quantize_head
from .recipe import METHOD_NONE, Recipe
from .rotation import check_sizes, residual_rotation, rotate_model_


@torch.no_grad()
def quantize_(model, recipe: Recipe | None = None, calib_ids: torch.Tensor | None = None, batch_size: int | None = None,
              calib_dtype: str = "auto", passes: tuple = DEFAULT_PASSES) -> list[dict]:
    """Quantize `model` in place; returns the per-layer report rows. `calib_dtype`: the dtype the calibration
    samples run through the blocks in (llmq.calib.resolve_calib_dtype; the same default as `llmq quantize`);
    `passes`: what the block loop does to each block (llmq.passes)."""
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
    loop = BlockLoop(adapter, recipe, next(model.parameters()).dtype, hidden, pos_emb, batch_size or 1, passes)
    del hidden
    layers, rows = {}, []
    for i, block in enumerate(blocks):
        done = loop.run_passes(i, block)
        install_quantized(block, done.prefix, done.tensors, done.layer_cfgs)
        loop.advance(block, done.output)  # not owned: the model's own block keeps its dtype
        layers.update(done.layer_cfgs)
        rows.extend(done.rows)
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
