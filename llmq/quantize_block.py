"""Quantizing one decoder block: collect each linear layer's input statistics (H = 2/N Σ x xᵀ, shared by
layers that read the same input), quantize every linear layer with the method its recipe names, and
report the error each layer makes. Used by both the streaming pipeline and in-memory `quantize_`."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import DecoderAdapter
from .blocks import StopForward, forward_block
from .formats import get_format
from .methods import METHODS
from .modules import LlmqLinear, layer_tensor_specs, set_submodule
from .recipe import METHOD_NONE, Recipe
from .rotation import layer_incoherence


@dataclass
class Calibration:
    """The calibration samples as they enter a block; `output`, when a staged pass already computed them,
    the samples as they leave the quantized block."""

    hidden: torch.Tensor  # [n, seqlen, d]
    position_embeddings: tuple
    batch_size: int = 1
    output: torch.Tensor | None = None


def _gram_edges(d: int) -> list[int]:
    """Column-block boundaries for `add_gram`: more blocks for wider inputs, where the saving pays."""
    nb = 4 if d >= 1024 else 2 if d >= 512 else 1
    return [round(i * d / nb) for i in range(nb + 1)]


def add_gram(S: torch.Tensor, x: torch.Tensor) -> None:
    """S += xᵀx on the upper block triangle only: the Gram matrix is symmetric, so with 4 column blocks 10 of
    16 block products are computed (measured 1.6x faster at d = 1536); `mirror_gram` fills the rest once."""
    e = _gram_edges(S.shape[0])
    for i in range(len(e) - 1):
        S[e[i] : e[i + 1], e[i] :].addmm_(x[:, e[i] : e[i + 1]].T, x[:, e[i] :])


def mirror_gram(S: torch.Tensor) -> torch.Tensor:
    e = _gram_edges(S.shape[0])
    for i in range(1, len(e) - 1):  # lower blocks <- transposed upper blocks
        S[e[i] :, e[i - 1] : e[i]] = S[e[i - 1] : e[i], e[i] :].T
    return S


class _GramSums:
    """Running Σ x xᵀ and token counts per key; `hessian(key)` = 2/N Σ x xᵀ."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, key, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if key not in self.sums:  # accumulate in place: H is the largest tensor here (in² floats)
            self.sums[key], self.counts[key] = torch.zeros(x.shape[1], x.shape[1]), 0
        add_gram(self.sums[key], x)
        self.counts[key] += x.shape[0]

    def hessian(self, key) -> torch.Tensor:
        return mirror_gram(self.sums.pop(key)).mul_(2.0 / self.counts.pop(key))


def collect_hessians(block: nn.Module, adapter: DecoderAdapter, calib: Calibration, groups=None) -> dict:
    """H = 2/N Σ x xᵀ for the inputs of each group of linear layers (one H per group, shared by its layers),
    from a forward pass of the block as it is now; the pass stops once the last wanted group has its input."""
    groups = groups or adapter.linear_groups
    grams, hooks = _GramSums(), []
    for gi, group in enumerate(groups):
        key, last = group[0], gi == len(groups) - 1

        def hook(_mod, args, key=key, last=last):
            grams.add(key, args[0])
            if last:
                raise StopForward

        hooks.append(block.get_submodule(key).register_forward_pre_hook(hook))
    try:
        forward_block(block, calib.hidden, calib.position_embeddings, calib.batch_size, keep_output=False)
    finally:
        for h in hooks:
            h.remove()
    hess = {}
    for group in groups:
        H = grams.hessian(group[0])
        for name in group:
            hess[name] = H
    return hess


def relative_output_error(w: torch.Tensor, q: torch.Tensor, H: torch.Tensor, wHw: float | None = None) -> float:
    """‖(W-Q)X‖² / ‖WX‖² computed from H ∝ X Xᵀ (the normalisation cancels); pass ‖WX‖² (`output_energy`)
    when comparing several Q for one W."""
    d = w - q
    num = float((d @ H).mul_(d).sum())
    return num / max(wHw if wHw is not None else output_energy(w, H), 1e-30)


def output_energy(w: torch.Tensor, H: torch.Tensor) -> float:
    return float((w @ H).mul_(w).sum())


def packed_bits_per_weight(tensors: dict[str, torch.Tensor], cfg: dict) -> float:
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return 8.0 * nbytes / (cfg["in_features"] * cfg["out_features"])


STAGED_MEMORY_FRACTION = 0.5  # a staged pass may use up to this share of the memory available when it starts


def _staged_fits(block: nn.Module, calib: Calibration) -> bool:
    """Whether all samples' activations inside the block fit in memory at once (see blocks.staged_pass_bytes)."""
    from .blocks import staged_pass_bytes

    cfg = getattr(block, "config", None) or getattr(getattr(block, "self_attn", None), "config", None)
    if cfg is None or os.environ.get("LLMQ_STAGED", "1") == "0":
        return False
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return staged_pass_bytes(cfg, calib.hidden.shape[0] * calib.hidden.shape[1]) < STAGED_MEMORY_FRACTION * avail


def quantize_block(block: nn.Module, prefix: str, adapter: DecoderAdapter, recipe: Recipe, out_dtype: torch.dtype,
                   calib: Calibration | None = None):
    """Quantize the linear layers of `block` (fp32). Returns (tensors to write, with full names;
    {layer name: layer config}; report rows). The block is consumed: its fp linear weights are dropped.

    Block-at-a-time (default): every layer's H comes from the unquantized block. True-sequential
    (`recipe.true_sequential`): q/k/v, then o, then gate/up, then down, each group's H collected with the
    groups before it already quantized, so later layers see (and compensate) earlier layers' error. It runs
    as one staged pass (blocks.StagedPass) when the samples' activations fit in memory, and then also leaves
    the quantized block's output in `calib.output`; otherwise it re-runs the block for each group."""
    tensors, layer_cfgs, rows = {}, {}, []
    quantized_params = set()
    rotated_h = {}  # per-layer Hadamard rotation: each group's H rotated once (its layers share V)
    linear_names = {n for group in adapter.linear_groups for n in group}

    def prepare(name: str, H: torch.Tensor | None):
        """(spec, fp32 weight, rotation, H) of one layer, in the rotated basis if the recipe rotates it."""
        full = prefix + name
        spec = recipe.spec_for(full)
        if spec.method == METHOD_NONE:
            return None
        w = masters.pop(f"{name}.weight").to(torch.float32)
        if not torch.isfinite(w).all():
            from .errors import InputError

            raise InputError(f"weight {full}.weight contains NaN or Inf values")
        group = next(g for g in adapter.linear_groups if name in g)
        inc = layer_incoherence(recipe, prefix + group[0], full, w.shape[1], w.shape[0])
        if inc is not None:  # quantize U W Vᵀ against V H Vᵀ; errors below are then in the rotated basis (equal)
            w = inc.weight(w)
            if H is not None:
                key = (group[0], id(H))
                if key not in rotated_h:
                    rotated_h[key] = inc.hessian(H)
                H = rotated_h[key]
        return spec, w, inc, H

    def quantize_group(names: list[str], H: torch.Tensor | None, dense: bool = False) -> dict:
        """Quantize layers that read the same input; returns {name: quantized stand-in module} (None for a
        layer the recipe keeps), computing with its decoded weight if `dense` (blocks.dense_forward). Layers
        with one spec and a method that quantizes rows independently given H (GPTQ) are quantized as one
        stacked matrix: one column loop instead of one per layer, same result."""
        t0 = time.perf_counter()
        prepared = {n: prepare(n, H) for n in names}
        todo = [n for n in names if prepared[n] is not None]
        results, shares = {}, {}
        stacked = len(todo) > 1 and len({repr(prepared[n][0]) for n in todo}) == 1 and len({id(prepared[n][3]) for n in todo}) == 1
        method = METHODS[prepared[todo[0]][0].method] if todo else None
        if stacked and method.quantize_stacked is not None:
            spec, _, _, Hg = prepared[todo[0]]
            results = dict(zip(todo, method.quantize_stacked([prepared[n][1] for n in todo], spec, Hg)))
        else:
            for n in todo:
                t = time.perf_counter()
                spec, w, _, Hn = prepared[n]
                results[n] = METHODS[spec.method].quantize(w, spec, Hn)
                shares[n] = time.perf_counter() - t
        quant_seconds = time.perf_counter() - t0
        total_rows = sum(prepared[n][1].shape[0] for n in todo)
        modules = {n: None for n in names}
        for n in todo:
            t = time.perf_counter()
            spec, w, inc, Hn = prepared[n]
            modules[n] = finish(n, spec, w, inc, Hn, results[n], dense)
            prepared[n] = None  # free the fp weight before the next (larger) layer
            own = shares.get(n, quant_seconds * w.shape[0] / total_rows)  # a stacked call: shared by rows
            rows[-1]["seconds"] = own + time.perf_counter() - t
        return modules

    def finish(name: str, spec, w: torch.Tensor, inc, H: torch.Tensor | None, q, dense: bool = False):
        """Pack one layer's result, record it, and report its errors; returns its quantized stand-in."""
        full = prefix + name
        lin = block.get_submodule(name)
        lin = getattr(lin, "inner", lin)  # inside a staged pass
        packed = q.pack()
        cfg = {"method": spec.method, **q.layer_config()}
        deq = get_format(cfg["format"]).dequantize(packed, cfg)
        if inc is not None:
            packed.update(inc.tensors())
            cfg = inc.layer_config(cfg)
        for k, v in packed.items():
            tensors[f"{full}.{k}"] = v
        tensors[f"{full}.weight"] = torch.zeros(0, dtype=torch.float16)  # placeholder, see llmq.hf
        quantized_params.add(f"{name}.weight")
        bias = masters.get(f"{name}.bias")
        bias = None if bias is None else bias.to(torch.float32)
        if bias is not None and inc is not None:
            bias = inc.bias(bias)  # stored in the rotated basis (llmq.rotation.incoherence)
        if bias is not None:
            tensors[f"{full}.bias"] = bias.to(out_dtype)
            quantized_params.add(f"{name}.bias")
        layer_cfgs[full] = cfg
        weight_err = float((w - deq).pow_(2).sum() / w.pow(2).sum().clamp_min(1e-30))
        output_err = rtn_err = None
        if H is not None:
            wHw = output_energy(w, H)
            known = getattr(q, "hessian_error", None)  # GPTQ's loop already has ‖(W−Q)X‖² (same H, same basis)
            output_err = float(known.sum()) / max(wHw, 1e-30) if known is not None else relative_output_error(w, deq, H, wHw)
            if spec.method != "rtn" and cfg["format"] == "int":  # the round-to-nearest baseline, same layer and grid
                rtn_err = relative_output_error(w, METHODS["rtn"].quantize(w, spec).dequantize(), H, wHw)
        module = LlmqLinear.from_packed(cfg, packed, None if bias is None else bias.to(out_dtype).to(torch.float32))
        if dense:
            from .blocks import dense_forward

            dense_forward(module, deq)
        del deq
        lin.weight = None  # the fp weight is no longer needed
        rows.append({
            "layer": full,
            "method": spec.method,
            "bits": cfg["bits"],
            "group_size": cfg["group_size"],
            "sym": cfg["sym"],
            "bpw": packed_bits_per_weight(packed, cfg),
            "weight_err": weight_err,
            "output_err": output_err,
            "rtn_output_err": rtn_err,
            "seconds": 0.0,
        })
        return module

    for pname, p in block.named_parameters():  # what the checkpoint will hold, so calibration sees it too
        if pname.rsplit(".", 1)[0] not in linear_names and p.dtype != out_dtype:
            p.data = p.data.to(out_dtype).to(p.dtype)
    # The values that are quantized and written; the block itself runs the calibration samples in their
    # dtype (bf16 calibration casts its parameters, not these).
    masters = {pname: p.detach() for pname, p in block.named_parameters()}
    if calib is not None and calib.hidden.dtype != torch.float32:
        from .blocks import cast_dense_params

        cast_dense_params(block, calib.hidden.dtype)

    if calib is None:
        for group in adapter.linear_groups:
            quantize_group(group, None)
    elif not recipe.true_sequential:
        hessians = collect_hessians(block, adapter, calib)
        for group in adapter.linear_groups:
            quantize_group(group, hessians[group[0]])
    elif _staged_fits(block, calib):
        from .blocks import StagedPass

        grams = _GramSums()
        groups = adapter.linear_groups

        def on_stage(k: int):
            for name, module in quantize_group(groups[k], grams.hessian(k), dense=True).items():
                if module is not None:
                    passer.replace(name, module)

        passer = StagedPass(block, groups, grams.add, on_stage)
        calib.output = passer.run(calib.hidden, calib.position_embeddings, calib.batch_size)
    else:
        for group in adapter.linear_groups:
            hessians = collect_hessians(block, adapter, calib, groups=[group])
            for name, module in quantize_group(group, hessians[group[0]]).items():
                if module is not None:  # later groups must see this layer's quantized output
                    set_submodule(block, name, module)

    for pname, p in block.state_dict().items():
        if pname not in quantized_params and pname.rsplit(".", 1)[0] not in {n[len(prefix):] for n in layer_cfgs}:
            p = masters.get(pname, p)
            if not torch.isfinite(p).all():
                from .errors import InputError

                raise InputError(f"tensor {prefix}{pname} contains NaN or Inf values")
            tensors[prefix + pname] = p.detach().to(out_dtype)
    return tensors, layer_cfgs, rows


def quantize_head(w: torch.Tensor, spec, recipe: Recipe | None = None, name: str = "lm_head") -> tuple[dict, dict]:
    """The LM head (no calibration statistics): its packed tensors, with the placeholder, and layer config.
    With a recipe asking for per-layer Hadamard rotation, the head is quantized rotated too."""
    w = w.to(torch.float32)
    inc = layer_incoherence(recipe, name, name, w.shape[1], w.shape[0]) if recipe is not None else None
    q = METHODS[spec.method].quantize(inc.weight(w) if inc is not None else w, spec, None)
    packed = q.pack()
    cfg = {"method": spec.method, **q.layer_config()}
    if inc is not None:
        packed.update(inc.tensors())
        cfg = inc.layer_config(cfg)
    packed["weight"] = torch.zeros(0, dtype=torch.float16)  # placeholder, see llmq.hf
    return packed, cfg


def install_quantized(block: nn.Module, prefix: str, tensors: dict, layer_cfgs: dict) -> nn.Module:
    """Make `block` compute what the checkpoint says: LlmqLinear for quantized layers, the written (possibly
    down-cast) values for everything else. The same code serves a fresh run and a resumed one."""
    local = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    for full, cfg in layer_cfgs.items():
        name = full[len(prefix):]
        packed = {k: local[f"{name}.{k}"] for k in layer_tensor_specs(cfg)}
        bias = local.get(f"{name}.bias")
        set_submodule(block, name, LlmqLinear.from_packed(cfg, packed, None if bias is None else bias.to(torch.float32)))
    quantized = {n[len(prefix):] for n in layer_cfgs}
    rest = {k: v.to(torch.float32) for k, v in local.items() if k.rsplit(".", 1)[0] not in quantized}
    missing, unexpected = block.load_state_dict(rest, strict=False, assign=True)
    missing = [m for m in missing if m.rsplit(".", 1)[0] not in quantized]
    if missing or unexpected:
        raise RuntimeError(f"block tensors do not match the block: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return block
