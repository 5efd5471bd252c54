"""Validation of method-specific recipe `options` (bad values are the user's: one-line InputError)."""

from __future__ import annotations

from ..errors import InputError


def check_options(options: dict, where: str, allowed: dict) -> None:
    """allowed: {name: predicate-and-description}, e.g. {"salient_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]")}."""
    if not isinstance(options, dict):
        raise InputError(f"{where}: options must be a mapping")
    for k, v in options.items():
        if k not in allowed:
            raise InputError(f"{where}: unknown option {k!r} (this method takes {', '.join(sorted(allowed))})")
        ok, what = allowed[k]
        try:
            good = ok(v)
        except TypeError:
            good = False
        if not good:
            raise InputError(f"{where}: option {k} must be {what}, got {v!r}")


def number(lo: float, hi: float):
    return (lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and lo <= v <= hi, f"a number in [{lo}, {hi}]")


def integer(lo: int, hi: int):
    return (lambda v: v is None or (not isinstance(v, bool) and isinstance(v, int) and lo <= v <= hi), f"an integer in [{lo}, {hi}]")


FLAG = (lambda v: isinstance(v, bool), "true or false")
DAMP = number(0.0, 10.0)
