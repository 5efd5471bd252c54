"""Method capabilities and the validation of method-specific recipe `options` (bad values are the user's:
one-line InputError).

Each method class declares, as class attributes,
  uses_fields:    the common recipe fields it reads, out of COMMON_FIELDS (a value given for another is refused);
  options_schema: {option: (predicate, description)}, every key its `quantize` reads from `spec.options`;
  needs_hessian:  it cannot run without calibration data;
  uses_calibration (default True): it uses calibration data when given (False: `--calib auto` skips it);
  check_spec / check_layer (optional): limits of a spec, and of a spec on a layer's shape, checked up front.
Values must have their YAML type: a quoted "false" is not a boolean, `true` is not an integer."""

from __future__ import annotations

import math

from ..errors import InputError

COMMON_FIELDS = ("bits", "group_size", "sym", "mse_clip")


def check_options(method, options: dict, where: str) -> None:
    schema = method.options_schema
    for k, v in options.items():
        if k not in schema:
            takes = f"{method.name} options: {', '.join(sorted(schema))}" if schema else f"{method.name} takes no options"
            raise InputError(f"{where}: {method.name} does not use {k} ({takes})")
        ok, what = schema[k]
        if not ok(v):
            raise InputError(f"{where}: option {k} must be {what}, got {v!r}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # YAML `true` is a bool, and bool is an int in Python


def is_number(v) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def number(lo: float, hi: float, above_lo: bool = False):
    return (lambda v: is_number(v) and (lo < v if above_lo else lo <= v) and v <= hi,
            f"a number in {'(' if above_lo else '['}{lo}, {hi}]")


def integer(lo: int, hi: int):
    return (lambda v: is_int(v) and lo <= v <= hi, f"an integer in [{lo}, {hi}]")


def optional(check):
    """None (YAML null) means "choose for me" for this option."""
    ok, what = check
    return (lambda v: v is None or ok(v), f"null or {what}")


def choice(*values):
    """One of `values`, of the same type (1 is not True, "2" is not 2)."""
    what = ", ".join(map(str, values[:-1])) + f" or {values[-1]}" if len(values) > 1 else str(values[0])
    return (lambda v: any(type(v) is type(c) and v == c for c in values), what)


FLAG = (lambda v: isinstance(v, bool), "true or false")
DAMP = number(0.0, 10.0, above_lo=True)  # λ = damp · mean diag H; 0 never grows on a failed factorisation
