"""Transforms applied to a layer's input and output: one ordered list per side in the layer config.

    y = O( W̃ (Tₙ ⋯ T₁ x) + b̃ )        "input_transforms": [T₁, …, Tₙ]   "output_transforms": [O₁, …] (O = ⋯ O₁)

Kinds (each names the per-layer tensor it reads, so the tensors are stored beside the format's):

    {"kind": "hadamard", "size": [m, p], "signs": NAME}      U = T·diag(s), T = (H_m ⊗ H_p)/√n, n = m·p (hadamard.py),
        ("block": b)                                         block-diagonal over runs of b = n features (HIGGS),
        ("inverse": true)                                    Uᵀ (the output side of a rotated layer);
                                                             NAME: int32 [ceil(features/32)], one sign bit per feature
    {"kind": "channel_scale", "tensor": NAME}                c ⊙ x, NAME: fp16 [features]

`"fused": true` marks a transform that belongs to the packed weight (HIGGS: the column scale and the rotation the
codes were computed in): the layer's kernel applies it to x (llmq.kernels registry), the format's reference decode
folds it into the weight (`Format.dequantize`: W̃ V diag(c)). Fused transforms come last. The others (`--rotate
hadamard`: V on the input, Uᵀ on the output) are applied by `LlmqLinear` around the packed matmul, and folded into the
weight by the CPU weight cache.

Checkpoints of format version 1 stored the same transforms under other keys ("rotate"/"had_in"/"had_out";
"lut_had"/"lut_had_block"/"lut_input_scale"), with the same tensors: `normalize` reads them.
"""

from __future__ import annotations

import torch

from .hadamard import BlockHadamard, RandomizedHadamard, factor

INPUT, OUTPUT = "input_transforms", "output_transforms"
LEGACY_KEYS = ("had_in", "had_out", "lut_had", "lut_had_block", "lut_input_scale")


def hadamard_entry(features: int, signs: str, block: int | None = None, inverse: bool = False, fused: bool = False) -> dict:
    e = {"kind": "hadamard", "size": list(factor(block or features)), "signs": signs}
    if block:
        e["block"] = block
    if inverse:
        e["inverse"] = True
    if fused:
        e["fused"] = True
    return e


def channel_scale_entry(tensor: str, fused: bool = False) -> dict:
    return {"kind": "channel_scale", "tensor": tensor, **({"fused": True} if fused else {})}


def normalize(cfg: dict) -> dict:
    """The layer config with a version-1 checkpoint's transform keys turned into the lists (same tensors, same order:
    the rotation's V first, then the lut format's column scale and rotation)."""
    if not any(k in cfg for k in LEGACY_KEYS):
        return cfg
    cfg = dict(cfg)
    ins, outs = [], []
    if "had_in" in cfg:
        ins.append({"kind": "hadamard", "size": list(cfg.pop("had_in")), "signs": "had_in_signs"})
        outs.append({"kind": "hadamard", "size": list(cfg.pop("had_out")), "signs": "had_out_signs", "inverse": True})
    if cfg.pop("lut_input_scale", False):
        ins.append(channel_scale_entry("lut_input_scale", fused=True))
    block = cfg.pop("lut_had_block", None)
    if "lut_had" in cfg:
        e = {"kind": "hadamard", "size": list(cfg.pop("lut_had")), "signs": "lut_signs", "fused": True}
        if block:
            e["block"] = block
        ins.append(e)
    for key, new in ((INPUT, ins), (OUTPUT, outs)):
        if new or key in cfg:
            cfg[key] = new + list(cfg.get(key, []))
    return cfg


def entries(cfg: dict, side: str = INPUT, fused: bool | None = None) -> list[dict]:
    """The config's transforms of one side (all, or only the fused / the online ones)."""
    out = normalize(cfg).get(side, [])
    return [e for e in out if fused is None or bool(e.get("fused")) == fused]


def _features(cfg: dict, side: str) -> int:
    return cfg["in_features"] if side == INPUT else cfg["out_features"]


def tensor_specs(cfg: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The tensors the layer's transforms read, beside its format's."""
    from ..formats.packing import packed_words

    specs = {}
    for side in (INPUT, OUTPUT):
        n = _features(cfg, side)
        for e in entries(cfg, side):
            if e["kind"] == "hadamard":
                specs[e["signs"]] = ((packed_words(n, 1),), torch.int32)
            elif e["kind"] == "channel_scale":
                specs[e["tensor"]] = ((n,), torch.float16)
            else:
                raise ValueError(f"unknown layer transform {e['kind']!r}")
    return specs


class Hadamard:
    """A randomized Hadamard transform (or its inverse) over the last dim, the signs unpacked once."""

    def __init__(self, e: dict, words: torch.Tensor, features: int):
        from ..formats.bitplanes import unpack_signs

        signs = unpack_signs(words.detach().cpu(), features).to(words.device)  # once, kept where the layer lives
        block = e.get("block")
        self.rh = BlockHadamard(signs, block) if block else RandomizedHadamard(signs)
        if [self.rh.m, self.rh.p] != list(e["size"]):  # a checkpoint from a build that factors sizes differently
            raise ValueError(f"layer stores a Hadamard transform {e['size']} but this llmq builds {[self.rh.m, self.rh.p]} "
                             f"for size {block or features}")
        self.inverse = bool(e.get("inverse"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rh.inverse(x) if self.inverse else self.rh.forward(x)

    def fold(self, w: torch.Tensor) -> torch.Tensor:
        """w·U (each row of w times U), so that (w·U) x = w (U x)."""
        return self.rh.forward(w) if self.inverse else self.rh.inverse(w)


class ChannelScale:
    def __init__(self, e: dict, c: torch.Tensor, features: int):
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.c.to(x.dtype)

    def fold(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.c.to(torch.float32)


KINDS = {"hadamard": (Hadamard, "signs"), "channel_scale": (ChannelScale, "tensor")}


def build(cfg: dict, tensors: dict[str, torch.Tensor], side: str = INPUT, fused: bool | None = None) -> list:
    """The transform objects of one side, in the order they apply."""
    out = []
    for e in entries(cfg, side, fused):
        cls, key = KINDS[e["kind"]]
        out.append(cls(e, tensors[e[key]], _features(cfg, side)))
    return out


def apply(transforms, x: torch.Tensor) -> torch.Tensor:
    for t in transforms:
        x = t.forward(x)
    return x


def fold_inputs(w: torch.Tensor, transforms) -> torch.Tensor:
    """W such that W x = w (Tₙ ⋯ T₁ x): the input transforms folded into the weight's rows, last first."""
    for t in reversed(list(transforms)):
        w = t.fold(w)
    return w


class LayerTransforms:
    """A layer's transforms, built once from its tensors: `online` inputs (LlmqLinear applies them), `fused` inputs
    (the kernel applies them), `outputs`."""

    def __init__(self, cfg: dict, tensors: dict[str, torch.Tensor]):
        flags = [bool(e.get("fused")) for e in entries(cfg, INPUT)]
        if flags != sorted(flags):
            raise ValueError("a layer's fused input transforms must come after its online ones")
        self.online = build(cfg, tensors, INPUT, fused=False)
        self.fused = build(cfg, tensors, INPUT, fused=True)
        self.outputs = build(cfg, tensors, OUTPUT)
        if any(e.get("fused") for e in entries(cfg, OUTPUT)):
            raise ValueError("output transforms cannot be fused into the packed weight")

    def __bool__(self) -> bool:
        return bool(self.online or self.fused or self.outputs)


__all__ = ["INPUT", "OUTPUT", "LayerTransforms", "apply", "build", "channel_scale_entry", "entries", "fold_inputs",
           "hadamard_entry", "normalize", "tensor_specs"]
