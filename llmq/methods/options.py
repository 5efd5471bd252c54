"""Value checks of method options (the `check` of each `option(...)` field, llmq.methods.base) and the common recipe
fields. A check is (predicate, description); bad values are the user's: a one-line InputError names the option.
Values must have their YAML type: a quoted "false" is not a boolean, `true` is not an integer."""

from __future__ import annotations

import math

COMMON_FIELDS = ("bits", "group_size", "sym", "mse_clip")


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
