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

`lm_head` is kept unquantized unless an override says otherwise. Values must have their YAML type (`sym: "false"`,
a string, is refused), and a value given for a field or option its method does not use is refused (each method
declares `uses_fields` and its `Options`, llmq.methods.base): bad input fails here, before a model is loaded.
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

# Every recipe key and its YAML type. Strict: a quoted "false" is a (truthy) string, `true` is not an integer.
_TYPES = {"method": str, "bits": int, "group_size": int, "sym": bool, "mse_clip": bool, "options": dict,
          "rotate": str, "rotate_seed": int, "rotate_vo": bool, "true_sequential": bool}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", dict: "a mapping"}


def _check_type(where: str, key: str, v) -> None:
    t = _TYPES[key]
    if not (isinstance(v, t) and (t is bool or not isinstance(v, bool))):
        raise InputError(f"{where}: {key} must be {_TYPE_NAMES[t]}, got {v!r}")


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

        for f in dataclasses.fields(self):
            _check_type(where, f.name, getattr(self, f.name))
        if self.method == METHOD_NONE:
            if self.options:
                raise InputError(f"{where}: method none (kept unquantized) takes no options")
            return self
        if self.method not in METHODS:
            raise InputError(f"{where}: unknown method {self.method!r} (choose from {', '.join(sorted(METHODS))}, none)")
        m = METHODS[self.method]
        if "bits" in m.uses_fields and not 2 <= self.bits <= 8:
            raise InputError(f"{where}: bits must be an integer from 2 to 8, got {self.bits!r}")
        if "group_size" in m.uses_fields and (self.group_size < 0 or 0 < self.group_size < 8):
            raise InputError(f"{where}: group size must be 0 (per-channel) or an integer >= 8, got {self.group_size!r}")
        m.check_options(self.options, where)
        m.check_spec(self, where)  # method-specific limits (e8p: bits 2, 3, 4)
        return self


_SPEC_FIELDS = {f.name for f in dataclasses.fields(LayerSpec)}
_RECIPE_FIELDS = {"overrides", "rotate", "rotate_seed", "rotate_vo", "true_sequential"}


def _method_label(method: str) -> str:
    return "method none (kept unquantized)" if method == METHOD_NONE else method


@dataclass
class Recipe:
    default: LayerSpec = field(default_factory=LayerSpec)
    overrides: list[dict] = field(default_factory=list)
    rotate: str = "none"  # none | hadamard | residual | both (llmq.rotation)
    rotate_seed: int = 0  # seeds the random sign vectors of the rotations
    rotate_vo: bool = True  # residual rotation also rotates V/O per head
    true_sequential: bool = False  # re-collect each linear group's inputs after the groups before it are quantized

    def _resolve(self, overrides: list[dict]) -> LayerSpec:
        """The default spec with `overrides` applied in order. Options are one method's knobs: a layer that an
        override switches to another method does not inherit the options written for the first."""
        spec, owner = self.default, self.default.method  # owner: the method the current options were written for
        for ov in overrides:
            spec = dataclasses.replace(spec, **{k: v for k, v in ov.items() if k != "match"})
            owner = spec.method if "options" in ov else owner
        return dataclasses.replace(spec, options=dict(spec.options) if spec.method == owner else {})

    def spec_for(self, module_name: str) -> LayerSpec:
        return self._resolve([ov for ov in DEFAULT_OVERRIDES + self.overrides if re.search(ov["match"], module_name)])

    def validate(self) -> "Recipe":
        """Types, ranges and shapes of everything in the recipe (not which keys were given: `from_dict`)."""
        from .rotation import ROTATE_MODES

        self.default.validate("recipe")
        for key in ("rotate", "rotate_seed", "rotate_vo", "true_sequential"):
            _check_type("recipe", key, getattr(self, key))
        if self.rotate not in ROTATE_MODES:
            raise InputError(f"recipe: unknown rotation {self.rotate!r} (choose from {', '.join(ROTATE_MODES)})")
        if not isinstance(self.overrides, list):
            raise InputError(f"recipe: overrides must be a list of mappings, got {self.overrides!r}")
        for i, ov in enumerate(self.overrides):
            where = f"recipe override #{i + 1}"
            if not isinstance(ov, dict):
                raise InputError(f"{where} must be a mapping with a 'match' regex, got {ov!r}")
            if "match" not in ov:
                raise InputError(f"{where} has no 'match' regex")
            if not isinstance(ov["match"], str):
                raise InputError(f"{where}: match must be a regex string, got {ov['match']!r}")
            try:
                re.compile(ov["match"])
            except re.error as e:
                raise InputError(f"{where} has a bad regex {ov['match']!r}: {e}") from None
            unknown = set(ov) - _SPEC_FIELDS - {"match"}
            if unknown:
                raise InputError(f"{where} has unknown keys {sorted(map(str, unknown))}")
            self._resolve([ov]).validate(f"{where} ({ov['match']!r})")
        if self.default.method == METHOD_NONE and all(ov.get("method", METHOD_NONE) == METHOD_NONE for ov in self.overrides):
            raise InputError("recipe: every layer is kept unquantized (method none): nothing to quantize")
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
    def from_dict(cls, d: dict | None) -> "Recipe":
        """Parse and check a recipe mapping; a key present is a value the user gave (so a field its method does
        not use is refused), a key absent takes the default."""
        if not isinstance(d or {}, dict):
            raise InputError(f"recipe must be a mapping, got {d!r}")
        d = dict(d or {})
        unknown = set(d) - _SPEC_FIELDS - _RECIPE_FIELDS
        if unknown:
            raise InputError(f"recipe: unknown keys {sorted(map(str, unknown))}")
        spec = {k: d[k] for k in _SPEC_FIELDS if k in d}
        rest = {k: d[k] for k in _RECIPE_FIELDS - {"overrides"} if k in d}
        overrides = [] if d.get("overrides") is None else d["overrides"]
        r = cls(default=LayerSpec(**spec), overrides=overrides, **rest).validate()
        from .methods.options import COMMON_FIELDS

        top = r.default.method
        for key in COMMON_FIELDS:
            if key in d:  # a top-level field also reaches the overrides that do not set it
                _check_used("recipe", key, [top] + [ov.get("method", top) for ov in r.overrides if key not in ov])
        for i, ov in enumerate(r.overrides):
            for key in COMMON_FIELDS:
                if key in ov:
                    _check_used(f"recipe override #{i + 1}", key, [ov.get("method", top)])
        return r

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        return cls.from_dict(_read_yaml(Path(path)))

    @classmethod
    def from_cli(cls, path: Path | None, *, method: str | None = None, bits: int | None = None,
                 group_size: int | None = None, sym: bool | None = None, mse_clip: bool | None = None,
                 act_order: bool | None = None, true_sequential: bool | None = None, rotate: str = "none") -> "Recipe":
        """`llmq quantize`'s recipe: the file's (or the defaults) with the flags the user gave (not None) on top,
        checked as if the recipe said them, so a flag the method does not use is refused too. `--rotate none`
        (the flag's default) keeps the recipe's rotation."""
        d = _read_yaml(Path(path)) if path else {}
        flags = {"method": method, "bits": bits, "group_size": group_size, "sym": sym, "mse_clip": mse_clip,
                 "true_sequential": true_sequential, "rotate": None if rotate == "none" and path else rotate}
        d.update({k: v for k, v in flags.items() if v is not None})
        if act_order is not None:  # a gptq option (a non-mapping `options` is reported by from_dict)
            opts = d.get("options") or {}
            d["options"] = {**opts, "act_order": act_order} if isinstance(opts, dict) else opts
        r = cls.from_dict(d)
        if group_size is None and not path:  # a method's own default group size (nf4: 64, QLoRA's block size)
            from .methods import METHODS

            m = METHODS.get(r.default.method)
            if m is not None and m.default_group_size is not None:
                r.default.group_size = m.default_group_size
        return r


def _check_used(where: str, key: str, methods: list[str]) -> None:
    """Refuse a common field the user gave that no method it reaches reads (e8p --group-size, billm --bits)."""
    from .methods import METHODS

    if not any(m != METHOD_NONE and key in METHODS[m].uses_fields for m in methods):
        raise InputError(f"{where}: {_method_label(methods[0])} does not use {key}")


def _read_yaml(p: Path):
    if not p.is_file():
        raise InputError(f"recipe file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"recipe file {p} is not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"cannot read recipe file {p}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"recipe file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is not None and not isinstance(data, dict):
        raise InputError(f"recipe file {p} must hold a mapping, got {type(data).__name__}")
    return data or {}
