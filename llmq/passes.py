"""The block loop and its passes: what happens to each decoder block, in order.

Both the streaming pipeline (`llmq quantize`) and in-memory `quantize_` run one `BlockLoop`:

    for each block i:
        work = BlockWork(block i as it is in the fp model, the calibration samples as they enter it)
        if a pass wants targets: work.targets = the fp block's outputs on those samples
        for each pass (measure, quantize, tune, ...): pass.run(work, loop)
        the samples move on through the block as the passes left it  ->  the inputs of block i + 1

A pass is any object with a `name`, a `wants_targets` flag and `run(work, loop)`; it may read the fp block,
the samples, the targets and what earlier passes wrote, and adds to `work.tensors / layer_cfgs / rows` (what the
checkpoint holds). `QuantizePass` is the pass every run has; a measurement pass (bit allocation) goes before it,
a tuning pass (block-wise fine-tuning, which fits the quantized block's output to `work.targets` through the
formats' differentiable torch decode) after it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from .adapters import DecoderAdapter
from .blocks import cast_dense_params, forward_block
from .quantize_block import Calibration, quantize_block
from .recipe import Recipe


@dataclass
class BlockWork:
    """One block as its passes see it, and what they produce for the checkpoint."""

    index: int
    prefix: str  # the block's module name with a trailing dot, e.g. "model.layers.3."
    block: nn.Module  # the fp block (fp32 weights); the quantize pass consumes its linear weights
    calib: Calibration | None  # the calibration samples as they enter the block; None for a data-free run
    targets: torch.Tensor | None = None  # the fp block's outputs on those samples, when a pass wants them
    tensors: dict = field(default_factory=dict)  # full tensor name -> tensor, as written
    layer_cfgs: dict = field(default_factory=dict)  # full layer name -> layer config
    rows: list = field(default_factory=list)  # report rows, one per quantized layer
    output: torch.Tensor | None = None  # the samples as they leave the quantized block, if a pass computed them


class BlockPass(Protocol):
    name: str
    wants_targets: bool  # the loop computes `work.targets` before the first pass when any pass says so

    def run(self, work: BlockWork, loop: "BlockLoop") -> None: ...


class QuantizePass:
    """Quantize every linear layer of the block with the method its recipe names (llmq.quantize_block)."""

    name = "quantize"
    wants_targets = False

    def run(self, work: BlockWork, loop: "BlockLoop") -> None:
        tensors, cfgs, rows = quantize_block(work.block, work.prefix, loop.adapter, loop.recipe, loop.out_dtype, work.calib)
        work.tensors.update(tensors)
        work.layer_cfgs.update(cfgs)
        work.rows.extend(rows)
        if work.calib is not None and work.calib.output is not None:  # a staged pass ran the samples through already
            work.output = work.calib.output


DEFAULT_PASSES: tuple = (QuantizePass(),)


class BlockLoop:
    """The per-block state shared by the passes (adapter, recipe, output dtype) and the calibration samples
    that travel from block to block (`hidden`: [n, seqlen, d] in the calibration dtype, None without data)."""

    def __init__(self, adapter: DecoderAdapter, recipe: Recipe, out_dtype: torch.dtype, hidden: torch.Tensor | None = None,
                 position_embeddings=None, batch_size: int = 1, passes: tuple = DEFAULT_PASSES):
        if not any(isinstance(p, QuantizePass) for p in passes):
            raise ValueError("the block passes must include the quantize pass")
        self.adapter, self.recipe, self.out_dtype = adapter, recipe, out_dtype
        self.hidden, self.position_embeddings, self.batch_size = hidden, position_embeddings, batch_size
        self.passes = tuple(passes)

    @property
    def calib_dtype(self) -> torch.dtype | None:
        return None if self.hidden is None else self.hidden.dtype

    def run_passes(self, index: int, block: nn.Module) -> BlockWork:
        """Run every pass on fp `block`; the samples do not move on until `advance`."""
        calib = Calibration(self.hidden, self.position_embeddings, self.batch_size) if self.hidden is not None else None
        work = BlockWork(index, self.adapter.block_prefix(index), block, calib)
        if calib is not None and any(p.wants_targets for p in self.passes):
            work.targets = forward_block(self.runner(block), self.hidden, self.position_embeddings, self.batch_size)
        for p in self.passes:
            p.run(work, self)
        return work

    def runner(self, block: nn.Module, owned: bool = False) -> nn.Module:
        """`block` as the samples run through it: in the calibration dtype (cast in place if the caller `owned`
        it, else a cast copy, so the block itself keeps its values)."""
        if self.calib_dtype in (None, torch.float32):
            return block
        return cast_dense_params(block if owned else copy.deepcopy(block), self.calib_dtype)

    def advance(self, quantized_block: nn.Module | None = None, output: torch.Tensor | None = None, owned: bool = False) -> None:
        """Move the samples on to the next block: `output` if a pass computed it, else through `quantized_block`
        (the block as the checkpoint holds it; `owned`: a throw-away block the loop may cast in place)."""
        if self.hidden is None:
            return
        if output is not None:
            self.hidden = output
        else:
            self.hidden = forward_block(self.runner(quantized_block, owned), self.hidden, self.position_embeddings,
                                        self.batch_size)
