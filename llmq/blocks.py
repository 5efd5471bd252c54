"""Running one decoder block at a time outside its model: a meta-device skeleton of the model gives
each block's class and layout; a real rotary embedding gives the position embeddings."""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import DecoderAdapter


class StopForward(Exception):
    """Raised by a hook that has seen what it needed; ends that batch's pass through the block."""


def forward_block(block: nn.Module, hidden: torch.Tensor, position_embeddings, batch_size: int = 1, keep_output: bool = True):
    """hidden [n, L, d] -> [n, L, d], `batch_size` sequences at a time, causal attention (sdpa, no mask).
    With keep_output=False the pass only feeds hooks (which may stop it early) and returns None."""
    seqlen = hidden.shape[1]
    pos = torch.arange(seqlen).unsqueeze(0)
    out = torch.empty_like(hidden) if keep_output else None
    with torch.no_grad(), dequantized_once(block):
        for s in range(0, hidden.shape[0], batch_size):
            h = hidden[s : s + batch_size]
            try:
                y = block(h, attention_mask=None, position_ids=pos, position_embeddings=position_embeddings, use_cache=False)
            except StopForward:
                continue
            if keep_output:
                out[s : s + batch_size] = y[0] if isinstance(y, tuple) else y
    return out


def dense_forward(m: nn.Module, weight: torch.Tensor | None = None) -> nn.Module:
    """Make packed layer `m` compute with its weight dequantized once (the same values its packed matmul
    uses; `weight` when the caller already decoded it) instead of unpacking it on every call: for the many
    calibration samples passing through a block. The dense weight is cast once per input dtype (bf16 passes)."""
    w, b, cast = m.dequantize() if weight is None else weight, m.bias, {}

    def forward(x):
        if x.dtype not in cast:
            cast[x.dtype] = (w.to(x.dtype), None if b is None else b.to(x.dtype))
        return F.linear(x, *cast[x.dtype])

    m._forward_packed = forward
    return m


def cast_dense_params(block: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the parameters of `block` that are not packed (norms, unquantized layers) to the calibration
    dtype; packed layers keep their tensors exact and cast their dequantized weight per input dtype."""
    from .modules import LlmqLinear

    packed = {id(p) for m in block.modules() if isinstance(m, LlmqLinear) for p in m.parameters()}
    for p in block.parameters():
        if id(p) not in packed and p.dtype != dtype and p.is_floating_point():
            p.data = p.data.to(dtype)
    return block


@contextmanager
def dequantized_once(block: nn.Module):
    """`dense_forward` for every packed layer of `block` while the context is open."""
    from .modules import LlmqLinear

    patched = [dense_forward(m) for m in block.modules() if isinstance(m, LlmqLinear)]
    try:
        yield
    finally:
        for m in patched:
            del m._forward_packed


class BlockFactory:
    def __init__(self, config, adapter: DecoderAdapter):
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(config)
        config._attn_implementation = "sdpa"  # causal without an explicit mask
        config.use_cache = False
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.config = config
        self.adapter = adapter
        rotary = self.skeleton.get_submodule(adapter.blocks.rsplit(".", 1)[0] + ".rotary_emb")
        self.rotary = type(rotary)(config=config)
        self.num_blocks = len(self.skeleton.get_submodule(adapter.blocks))

    def meta_block(self, i: int) -> nn.Module:
        """Block i with no storage yet: tensors are attached with `assign`, so nothing is allocated twice."""
        return copy.deepcopy(self.skeleton.get_submodule(f"{self.adapter.blocks}.{i}")).eval()

    def block(self, i: int, state: dict[str, torch.Tensor]) -> nn.Module:
        b = self.meta_block(i)
        b.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True, assign=True)
        return b

    def position_embeddings(self, seqlen: int, dtype: torch.dtype = torch.float32):
        x = torch.zeros(1, seqlen, 1, dtype=dtype)  # cos/sin come out in x's dtype (computed in fp32)
        return self.rotary(x, torch.arange(seqlen).unsqueeze(0))


class _StagePoint(nn.Module):
    """Stands in for one linear layer during a staged pass: the first layer of stage k that a sample reaches
    hands its input to the runner and pauses that sample; on resume it runs whatever `inner` is by then (the
    quantized layer, once stage k has been quantized)."""

    def __init__(self, inner: nn.Module, stage: int, runner: "StagedPass"):
        super().__init__()
        self.inner, self.stage = inner, stage
        object.__setattr__(self, "runner", runner)  # not a submodule

    def forward(self, x):
        self.runner.arrive(self.stage, x)
        return self.inner(x)


class _Abort(BaseException):
    """Unwinds a paused sample when the pass is abandoned (an error elsewhere)."""


class StagedPass:
    """One forward pass of all calibration samples through a block, stopping at each linear group in turn.

    True-sequential GPTQ needs, for each group of linear layers (q/k/v, o, gate/up, down), the inputs that
    all samples produce with the *earlier* groups already quantized. Re-running the block from its start for
    every group costs ~2.5 passes; here every sample runs as a paused coroutine (its own thread, only one
    running at a time): all samples advance to group k's input, `on_stage(k, inputs…)` quantizes group k,
    then they continue through the quantized layers to group k+1. One pass in total, and its output is the
    quantized block's output — the hidden states the next block needs. The price is memory: all samples'
    intermediate activations are alive at once (see `staged_pass_bytes`)."""

    def __init__(self, block: nn.Module, groups: list[list[str]], on_input, on_stage):
        self.block, self.groups, self.on_input, self.on_stage = block, groups, on_input, on_stage
        self._local = threading.local()
        self._abort = False

    def arrive(self, stage: int, x: torch.Tensor) -> None:
        me = self._local.worker
        if stage <= me["stage"]:
            return  # a later layer of a group this sample has already passed
        if stage != me["stage"] + 1:
            raise RuntimeError(f"linear group {self.groups[stage]} was reached before group {self.groups[me['stage'] + 1]}")
        me["stage"] = stage
        self.on_input(stage, x)
        self._pause(me)

    def _pause(self, me) -> None:
        me["paused"].set()
        me["go"].wait()
        me["go"].clear()
        if self._abort:
            raise _Abort

    def run(self, hidden: torch.Tensor, position_embeddings, batch_size: int = 1) -> torch.Tensor:
        from .modules import set_submodule

        seqlen = hidden.shape[1]
        pos = torch.arange(seqlen).unsqueeze(0)
        out = torch.empty_like(hidden)
        names = {n: k for k, g in enumerate(self.groups) for n in g}
        originals = {n: self.block.get_submodule(n) for n in names}
        for n, k in names.items():
            set_submodule(self.block, n, _StagePoint(originals[n], k, self))
        workers = []

        def work(me, s):
            self._local.worker = me
            try:
                me["go"].wait()
                me["go"].clear()
                if self._abort:
                    return
                with torch.no_grad():
                    y = self.block(hidden[s : s + batch_size], attention_mask=None, position_ids=pos,
                                   position_embeddings=position_embeddings, use_cache=False)
                out[s : s + batch_size] = y[0] if isinstance(y, tuple) else y
                me["stage"] = len(self.groups)
            except _Abort:
                pass
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                me["error"] = e
            finally:
                me["paused"].set()

        try:
            for s in range(0, hidden.shape[0], batch_size):
                me = {"stage": -1, "go": threading.Event(), "paused": threading.Event(), "error": None}
                me["thread"] = threading.Thread(target=work, args=(me, s), daemon=True)
                me["thread"].start()
                workers.append(me)
            for k in range(len(self.groups) + 1):
                for me in workers:  # advance each sample, one at a time, to group k (k = end: through the block)
                    me["paused"].clear()
                    me["go"].set()
                    me["paused"].wait()
                    if me["error"] is not None:
                        raise me["error"]
                    if me["stage"] != k:
                        raise RuntimeError(f"a calibration sample never reached linear group {self.groups[k]}")
                if k < len(self.groups):
                    self.on_stage(k)
        finally:
            self._abort = True
            for me in workers:
                me["go"].set()
            for me in workers:
                me["thread"].join()
            for n in names:
                point = self.block.get_submodule(n)
                set_submodule(self.block, n, point.inner if isinstance(point, _StagePoint) else point)
        return out

    def replace(self, name: str, module: nn.Module) -> None:
        """Put the quantized layer in place of `name`; paused samples use it when they resume."""
        self.block.get_submodule(name).inner = module


def staged_pass_bytes(config, tokens: int) -> int:
    """Rough peak of a staged pass: every sample's activations inside the block are alive at once
    (residual, normed input, q/k/v, attention output, MLP gate/up/product)."""
    d = config.hidden_size
    ffn = getattr(config, "intermediate_size", 4 * d)
    return 4 * tokens * (6 * d + 3 * ffn)
