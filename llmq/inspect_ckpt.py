"""What an llmq checkpoint holds: recipe, per-layer method and bits per weight (from the bytes actually
stored), and total size."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .checkpoint import validate_checkpoint


def tensor_bytes(folder: Path) -> dict[str, int]:
    """Bytes stored per tensor of a (validated) llmq checkpoint."""
    return {k: t.nbytes for k, t in validate_checkpoint(folder).tensors.items()}


def inspect_checkpoint(path: str) -> dict:
    ckpt = validate_checkpoint(path)  # a missing or damaged shard would otherwise count as zero bytes
    folder, qc = ckpt.folder, ckpt.quant_config
    sizes = {k: t.nbytes for k, t in ckpt.tensors.items()}
    layer_bytes = defaultdict(int)
    for name, nbytes in sizes.items():
        owner, _, leaf = name.rpartition(".")
        if owner in ckpt.layers and leaf != "bias":
            layer_bytes[owner] += nbytes
    layers = []
    for name, cfg in ckpt.layers.items():
        n = cfg["in_features"] * cfg["out_features"]
        layers.append({"layer": name, **cfg, "bytes": layer_bytes[name], "bpw": 8 * layer_bytes[name] / n})
    q_bytes = sum(layer_bytes.values())
    q_weights = sum(c["in_features"] * c["out_features"] for c in ckpt.layers.values())
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
