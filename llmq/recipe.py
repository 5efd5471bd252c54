"""Recipes: what to do to each linear layer.

A recipe is a default `LayerSpec` plus regex overrides applied in order (later ones win), e.g.

    method: rtn
    bits: 3
    group_size: 128
    sym: true
    overrides:
      - match: 'mlp\\.down_proj'   # re.search on the module name
        bits: 4
      - match: 'lm_head'
        method: none               # keep 16-bit

`lm_head` is kept unquantized unless an override says otherwise.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import InputError

METHOD_NONE = "none"  # keep the layer in its original precision
DEFAULT_OVERRIDES = [{"match": r"(^|\.)lm_head$", "method": METHOD_NONE}]


@dataclass
class LayerSpec:
    method: str = "rtn"
    bits: int = 4
    group_size: int = 128  # 0 = per output channel
    sym: bool = True
    mse_clip: bool = False  # search a clipped range minimising the group's squared error
    options: dict = field(default_factory=dict)  # method-specific knobs

    def validate(self, where: str = "recipe") -> "LayerSpec":
        from .methods import METHODS

        if self.method != METHOD_NONE and self.method not in METHODS:
            raise InputError(f"{where}: unknown method {self.method!r} (choose from {', '.join(sorted(METHODS))}, none)")
        if self.method == METHOD_NONE:
            return self
        if getattr(METHODS[self.method], "uses_bits", True) and (not isinstance(self.bits, int) or not 2 <= self.bits <= 8):
            raise InputError(f"{where}: bits must be an integer from 2 to 8, got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 0 or 0 < self.group_size < 8:
            raise InputError(f"{where}: group size must be 0 (per-channel) or an integer >= 8, got {self.group_size!r}")
        check = getattr(METHODS[self.method], "check_options", None)  # method-specific knobs in `options`
        if check is not None:
            check(self.options, where)
        check_spec = getattr(METHODS[self.method], "check_spec", None)  # method-specific limits (e8p: bits 2, 3, 4)
        if check_spec is not None:
            check_spec(self, where)
        return self


_SPEC_FIELDS = {f.name for f in dataclasses.fields(LayerSpec)}


@dataclass
class Recipe:
    default: LayerSpec = field(default_factory=LayerSpec)
    overrides: list[dict] = field(default_factory=list)
    rotate: str = "none"  # none | hadamard | residual | both (llmq.rotation)
    rotate_seed: int = 0  # seeds the random sign vectors of the rotations
    rotate_vo: bool = True  # residual rotation also rotates V/O per head
    true_sequential: bool = False  # re-collect each linear group's inputs after the groups before it are quantized

    def spec_for(self, module_name: str) -> LayerSpec:
        spec = dataclasses.replace(self.default, options=dict(self.default.options))
        for ov in DEFAULT_OVERRIDES + self.overrides:
            if re.search(ov["match"], module_name):
                changes = {k: v for k, v in ov.items() if k != "match"}
                spec = dataclasses.replace(spec, **changes)
        return spec

    def validate(self) -> "Recipe":
        self.default.validate("recipe")
        from .rotation import ROTATE_MODES

        if self.rotate not in ROTATE_MODES:
            raise InputError(f"recipe: unknown rotation {self.rotate!r} (choose from {', '.join(ROTATE_MODES)})")
        if not isinstance(self.rotate_seed, int) or isinstance(self.rotate_seed, bool):
            raise InputError(f"recipe: rotate_seed must be an integer, got {self.rotate_seed!r}")
        for i, ov in enumerate(self.overrides):
            if "match" not in ov:
                raise InputError(f"recipe: override #{i + 1} has no 'match' regex")
            try:
                re.compile(ov["match"])
            except re.error as e:
                raise InputError(f"recipe: override #{i + 1} has a bad regex {ov['match']!r}: {e}") from None
            unknown = set(ov) - _SPEC_FIELDS - {"match"}
            if unknown:
                raise InputError(f"recipe: override #{i + 1} has unknown keys {sorted(unknown)}")
            dataclasses.replace(self.default, **{k: v for k, v in ov.items() if k != "match"}).validate(
                f"recipe override {ov['match']!r}"
            )
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self.default)
        d["overrides"] = [dict(o) for o in self.overrides]
        d["rotate"] = self.rotate
        if self.rotate != "none":
            d["rotate_seed"], d["rotate_vo"] = self.rotate_seed, self.rotate_vo
        d["true_sequential"] = self.true_sequential
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        d = dict(d or {})
        overrides = d.pop("overrides", []) or []
        rotate = d.pop("rotate", "none")
        rot_kw = {k: d.pop(k) for k in ("rotate_seed", "rotate_vo") if k in d}
        true_sequential = bool(d.pop("true_sequential", False))
        unknown = set(d) - _SPEC_FIELDS
        if unknown:
            raise InputError(f"recipe: unknown keys {sorted(unknown)}")
        if not isinstance(overrides, list):
            raise InputError("recipe: 'overrides' must be a list")
        return cls(default=LayerSpec(**d), overrides=overrides, rotate=rotate, true_sequential=true_sequential,
                   **rot_kw)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        p = Path(path)
        if not p.is_file():
            raise InputError(f"recipe file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise InputError(f"recipe file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if data is not None and not isinstance(data, dict):
            raise InputError(f"recipe file {p} must hold a mapping")
        return cls.from_dict(data)
