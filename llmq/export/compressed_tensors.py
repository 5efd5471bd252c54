"""Export an llmq int-format checkpoint as compressed-tensors `pack-quantized`, loadable by transformers (with
the `compressed-tensors` package, no llmq) and servable by vLLM.

The two formats share the packing, so the integer payload is copied, not recomputed:

    llmq            w = scale · (u − 2^(b−1)),   u ∈ [0, 2^b) packed densely along the input dim, low bits first
    compressed-t.   w = scale · q,   q = u − 2^(b−1) ∈ [−2^(b−1), 2^(b−1)),  stored as q + 2^(b−1) = u, same packing

so per quantized linear layer `p`:

    p.qweight  int32 [out, ceil(in·b/32)]  ->  p.weight_packed  (identical bytes)
    p.scales   fp16  [out, groups]         ->  p.weight_scale   (in the exported model dtype, as compressed-tensors does)
    (nothing)                              ->  p.weight_shape   int64 [out, in]
    p.weight   zero-length placeholder     ->  dropped

What the target cannot represent is refused (one line each): asymmetric zero points (transformers 5.x cannot
load pack-quantized zero points: the meta model expects them unpacked), bit widths other than 4 and 8
(compressed-tensors 0.17, which vLLM pins, and 0.20 pack 3/5/6/7 bits differently), a stored per-column group
index `g_idx` (vLLM rejects it; llmq's GPTQ act-order uses static groups and stores none: its codes keep the
original column order and group i covers columns [i·g, (i+1)·g), the plain layout, so it exports), a group size that does not divide a layer's input dimension (compressed-tensors has no
shorter last group), layers quantized in a rotated basis (online transforms), other formats, and mixed
schemes across layers (one config group with `targets: ["Linear"]`, as compressed-tensors writes it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint import Checkpoint
from ..errors import InputError
from ..transforms import INPUT, OUTPUT, entries

CT_VERSION = "0.20.0"  # the compressed-tensors release whose writer this reproduces (byte-identical tensors)
SUPPORTED_BITS = (4, 8)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TORCH_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
SKIP_FILES = {"config.json", "model.safetensors.index.json", "llmq_report.json"}


def _refusal(name: str, cfg: dict) -> str | None:
    if cfg.get("format") != "int":
        return f"{name} uses format {cfg.get('format')!r}; only the int format maps to pack-quantized"
    if cfg.get("rotate") not in (None, "none"):
        return f"{name} is quantized in a rotated basis ({cfg['rotate']}), which needs online transforms compressed-tensors checkpoints do not carry"
    if any(entries(cfg, side) for side in (INPUT, OUTPUT)):
        return f"{name} has input/output transforms, which compressed-tensors checkpoints do not carry"
    if not cfg["sym"]:
        return (f"{name} is asymmetric; transformers cannot load pack-quantized zero points "
                "(re-quantize with --sym)")
    if cfg["bits"] not in SUPPORTED_BITS:
        return (f"{name} has {cfg['bits']}-bit codes; only 4 and 8 bits pack the same in every compressed-tensors "
                "release (vLLM pins one that packs other widths differently)")
    if cfg.get("act_order"):  # the format's flag for a stored g_idx (llmq's own static-group act-order sets none)
        return (f"{name} stores a per-column group index (g_idx), which vLLM rejects; only the plain layout "
                "(group i = columns [i·g, (i+1)·g)) exports")
    gs = cfg["group_size"]
    if gs and cfg["in_features"] % gs:
        return (f"{name}: group size {gs} does not divide its {cfg['in_features']} input features (compressed-tensors "
                f"has no shorter last group); use a group size that divides every input dimension")
    return None


def check_exportable(layers: dict) -> tuple[int, int]:
    """(bits, group_size) shared by every layer, or InputError naming the first thing the target cannot hold."""
    if not layers:
        raise InputError("the checkpoint has no quantized layers to export")
    for name, cfg in layers.items():
        why = _refusal(name, cfg)
        if why:
            raise InputError(f"cannot export to compressed-tensors: {why}")
    schemes = {(c["bits"], c["group_size"] or 0) for c in layers.values()}
    if len(schemes) > 1:
        raise InputError(f"cannot export to compressed-tensors: layers use different schemes {sorted(schemes)} (bits, group size); "
                         "this exporter writes one scheme for all linear layers")
    return schemes.pop()


def quantization_config(bits: int, group_size: int, ignore: list[str]) -> dict:
    """config.json `quantization_config`, as compressed-tensors' ModelCompressor.update_config writes it."""
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "group" if group_size else "channel", "group_size": group_size or None}
    return {
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


def linear_module_names(config: dict) -> list[str]:
    """Names of every nn.Linear of the model the config describes (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in config.items() if k != "quantization_config"}
    hf_cfg = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def convert_tensors(tensors: dict[str, torch.Tensor], layers: dict, dtype: torch.dtype | None,
                    scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One shard's tensors, llmq names -> compressed-tensors names; `dtype` (if given) casts the float tensors."""
    out = {}
    for key, t in tensors.items():
        owner, _, leaf = key.rpartition(".")
        if owner in layers:
            cfg = layers[owner]
            if leaf == "weight":
                continue  # the zero-length placeholder that makes a plain load of an llmq checkpoint fail
            if leaf == "qweight":
                out[f"{owner}.weight_packed"] = t.contiguous()
                out[f"{owner}.weight_shape"] = torch.tensor([cfg["out_features"], cfg["in_features"]], dtype=torch.int64)
            elif leaf == "scales":
                out[f"{owner}.weight_scale"] = t.to(scale_dtype).contiguous()
            elif leaf == "bias":
                out[key] = t.to(dtype) if dtype is not None else t
            else:
                raise InputError(f"cannot export to compressed-tensors: unexpected tensor {key}")
        else:
            out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def write(ckpt: Checkpoint, work: Path, dtype: str = "auto", log=print) -> dict:
    """Write the compressed-tensors model of the (validated) llmq checkpoint CKPT into the empty folder WORK
    (llmq.export.export_checkpoint checks the destination and renames WORK into place). Returns a summary."""
    src, config, layers = ckpt.folder, ckpt.config, ckpt.layers
    if dtype != "auto" and dtype not in DTYPES:
        raise InputError(f"--dtype must be auto, fp16, bf16 or fp32, got {dtype!r}")
    bits, group_size = check_exportable(layers)

    linears = set(linear_module_names(config))
    not_linear = sorted(set(layers) - linears)
    if not_linear:
        raise InputError(f"cannot export to compressed-tensors: {not_linear[0]} is not a Linear module of this architecture")
    ignore = sorted(linears - set(layers))

    target = DTYPES.get(dtype)
    model_dtype = target or getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
    shards = sorted({t.file for t in ckpt.tensors.values()})  # those the index names, each checked complete
    weight_map, total, rounded = {}, 0, 0
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for owner in {k.rpartition(".")[0] for k in tensors} & set(layers):
            s = tensors[f"{owner}.scales"]
            rounded += int((s.to(model_dtype).to(s.dtype) != s).sum())
        converted = convert_tensors(tensors, layers, target, model_dtype)
        save_file(converted, str(work / shard.name), metadata={"format": "pt"})
        for k, t in converted.items():
            weight_map[k] = shard.name
            total += t.numel() * t.element_size()
    (work / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name not in SKIP_FILES:
            shutil.copy2(p, work / p.name)
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    if target is not None:
        config["dtype"] = TORCH_DTYPE_NAMES[target]
    config["quantization_config"] = quantization_config(bits, group_size, ignore)
    (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    summary = {"layers": len(layers), "bits": bits, "group_size": group_size, "ignore": ignore,
               "scale_dtype": TORCH_DTYPE_NAMES.get(model_dtype, str(model_dtype)), "scales_rounded": rounded,
               "bytes": total}
    if rounded:
        log(f"note: {rounded} scales are not exactly representable in {summary['scale_dtype']} and were rounded "
            "(export with --dtype fp16 or fp32 to keep them exact)")
    return summary
