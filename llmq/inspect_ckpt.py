"""What an llmq checkpoint holds: recipe, per-layer method and bits per weight (from the bytes actually
stored), and total size."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .errors import InputError
from .loading import is_llmq_checkpoint
from .source import check_safetensors_file

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def tensor_bytes(folder: Path) -> dict[str, int]:
    import struct

    sizes = {}
    for p in sorted(folder.glob("*.safetensors")):
        check_safetensors_file(p)
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                sizes[k] = v["data_offsets"][1] - v["data_offsets"][0]
    return sizes


def inspect_checkpoint(path: str) -> dict:
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"checkpoint folder does not exist: {folder}")
    if not is_llmq_checkpoint(folder):
        raise InputError(f"{folder} is not an llmq checkpoint (no quantization_config with quant_method 'llmq')")
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    sizes = tensor_bytes(folder)
    layer_bytes = defaultdict(int)
    for name, nbytes in sizes.items():
        owner, _, leaf = name.rpartition(".")
        if owner in qc["layers"] and leaf != "bias":
            layer_bytes[owner] += nbytes
    layers = []
    for name, cfg in qc["layers"].items():
        n = cfg["in_features"] * cfg["out_features"]
        layers.append({"layer": name, **cfg, "bytes": layer_bytes[name], "bpw": 8 * layer_bytes[name] / n})
    q_bytes = sum(layer_bytes.values())
    q_weights = sum(c["in_features"] * c["out_features"] for c in qc["layers"].values())
    files = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return {
        "checkpoint": str(folder),
        "format_version": qc.get("format_version"),
        "recipe": qc.get("recipe"),
        "calibration": qc.get("calibration"),
        "layers": layers,
        "quantized_weights": q_weights,
        "quantized_bytes": q_bytes,
        "quantized_bpw": 8 * q_bytes / q_weights if q_weights else None,
        "tensor_bytes": sum(sizes.values()),
        "unquantized_tensor_bytes": sum(sizes.values()) - q_bytes,
        "total_file_bytes": files,
    }
