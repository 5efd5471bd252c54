"""The one validator of an llmq checkpoint folder. `llmq inspect`, every `llmq export` format and the loading
for `llmq eval` run it first, so a damaged or too-new checkpoint is refused with one line naming the file or
tensor, instead of a wrong bits-per-weight figure, an export with layers missing, or NaN logits."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import InputError
from .source import SAFETENSORS_INDEX, safetensors_header

QUANT_METHOD = "llmq"
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


class TensorInfo(NamedTuple):
    file: Path
    dtype: str  # safetensors spelling: F16, I32, ...
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class Checkpoint:
    folder: Path
    config: dict  # config.json
    layers: dict  # quantized layer name -> its layer config
    tensors: dict[str, TensorInfo]  # every tensor of the shards the checkpoint uses

    @property
    def quant_config(self) -> dict:
        return self.config["quantization_config"]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"cannot read {path}: not a JSON object")
    return data


def llmq_config(folder: Path) -> dict | None:
    """config.json of an llmq checkpoint; None for a plain model or a folder without config.json."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    config = _read_json(path)
    qc = config.get("quantization_config")
    return config if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else None


def check_format_version(version, where: str = "the checkpoint") -> None:
    """Readers refuse a format they do not know (README "Checkpoint format"): a newer one may lay tensors out differently."""
    from .formats import FORMAT_VERSION

    if type(version) is not int or version < 1:
        raise InputError(f"{where} has no valid llmq format_version (found {version!r})")
    if version > FORMAT_VERSION:
        raise InputError(f"{where} uses llmq format version {version}; this llmq reads up to {FORMAT_VERSION} (upgrade llmq)")


def _shard_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of the shards the index names (or of model.safetensors), after checking each shard is complete
    and holds every tensor the index promises."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(f"{index} has no weight_map")
    elif (folder / "model.safetensors").is_file():
        weight_map = None
    else:
        raise InputError(f"no model.safetensors or {SAFETENSORS_INDEX} in {folder}")
    tensors = {}
    for name in sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]:
        path = folder / name
        if not path.is_file():
            raise InputError(f"shard {path} listed in {SAFETENSORS_INDEX} is missing")
        for k, v in safetensors_header(path).items():
            start, stop = v["data_offsets"]
            tensors[k] = TensorInfo(path, v["dtype"], tuple(v["shape"]), stop - start)
    for k, name in (weight_map or {}).items():
        if k not in tensors or tensors[k].file.name != name:
            raise InputError(f"tensor {k} listed in {SAFETENSORS_INDEX} is missing from {folder / name}")
    return tensors


def _check_layer(name: str, cfg, tensors: dict[str, TensorInfo]) -> None:
    """The tensors the layer's format needs (shape, dtype), the zero-length `weight` placeholder, an optional bias."""
    from .modules import layer_tensor_specs

    try:
        specs = layer_tensor_specs(cfg)
        out = int(cfg["out_features"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"layer config of {name} in config.json is invalid: {type(e).__name__}: {e}") from None
    specs = {**specs, "weight": ((0,), None), "bias": ((out,), None)}  # None: any dtype
    for leaf, (shape, dtype) in specs.items():
        key, t = f"{name}.{leaf}", tensors.get(f"{name}.{leaf}")
        if t is None:
            if leaf == "bias":
                continue
            raise InputError(f"tensor {key} is missing (the {cfg['format']} format of {name} needs it)")
        want = SAFETENSORS_DTYPES[dtype] if dtype is not None else t.dtype
        if t.shape != tuple(shape) or t.dtype != want:
            raise InputError(f"tensor {key} in {t.file} has shape {list(t.shape)} dtype {t.dtype}; "
                             f"the {cfg['format']} format of {name} needs shape {list(shape)} dtype {want}")
    extra = sorted(k for k in tensors if k.rpartition(".")[0] == name and k.rpartition(".")[2] not in specs)
    if extra:
        raise InputError(f"tensor {extra[0]} in {tensors[extra[0]].file} is not part of the {cfg['format']} format of {name}")


def validate_checkpoint(folder) -> Checkpoint:
    """Check that FOLDER is an llmq checkpoint this llmq reads and that every tensor it needs is there, complete,
    with the right shape and dtype. InputError (one line, naming the file or tensor) otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"checkpoint folder does not exist: {folder}")
    config = llmq_config(folder)
    if config is None:
        raise InputError(f"{folder} is not an llmq checkpoint (no quantization_config with quant_method 'llmq')")
    qc = config["quantization_config"]
    check_format_version(qc.get("format_version"), str(folder / "config.json"))
    layers = qc.get("layers")
    if not isinstance(layers, dict):
        raise InputError(f"{folder / 'config.json'} lists no quantized layers")
    tensors = _shard_tensors(folder)
    for name, cfg in layers.items():
        _check_layer(name, cfg, tensors)
    return Checkpoint(folder, config, layers, tensors)
