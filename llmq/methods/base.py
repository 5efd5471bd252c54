"""The method contract: what every quantization method declares, and the registry (`@register` next to each
definition fills METHODS).

A method declares its name, the packed format it writes, its bit widths (for `llmq methods`), whether it uses
calibration data, the common recipe fields it reads (`uses_fields`, out of COMMON_FIELDS: a value given for another
is refused) and a typed `Options` dataclass, one field per recipe option with its default, its value check and a
one-line doc (`option(...)`). `quantize(weight, spec, hessian)` is the work; `quantize_stacked`, `check_spec` and
`check_layer` are optional."""

from __future__ import annotations

import dataclasses
import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from ..errors import InputError


class Calibration(enum.Enum):
    NEEDS = "needs"  # cannot run without calibration data
    USES = "uses when given"  # better with it, runs without (H = I or unweighted)
    IGNORES = "ignores"  # weights alone: `--calib auto` skips the calibration forward


def option(default: Any, check: tuple[Callable[[Any], bool], str], doc: str):
    """A field of a method's Options: default, value check ((predicate, description), llmq.methods.options), doc."""
    return field(default=default, metadata={"check": check, "doc": doc})


@dataclass(frozen=True)
class NoOptions:
    pass


class Method(ABC):
    name: ClassVar[str]
    format: ClassVar[str]  # the llmq.formats name of what `quantize` returns
    bit_widths: ClassVar[str]  # for people: "2-8", "2, 3, 4", "1.58"
    calibration: ClassVar[Calibration]
    uses_fields: ClassVar[frozenset[str]]
    Options: ClassVar[type] = NoOptions
    default_group_size: ClassVar[int | None] = None  # the method's own default for `--group-size` (nf4: 64)
    # Optional: (weights, spec, hessian) -> list of results, for layers sharing one H (q/k/v, gate/up) quantized as
    # one stacked matrix; only for methods that treat rows independently given H (equal to one by one).
    quantize_stacked: ClassVar[Callable | None] = None

    @abstractmethod
    def quantize(self, weight: torch.Tensor, spec, hessian: torch.Tensor | None = None):
        """The quantized value object of `format` for one layer; `hessian` is its input's 2XXᵀ/N, or None."""

    def check_spec(self, spec, where: str) -> None:
        """Limits of a spec (e8p: bits 2, 3, 4), checked when the recipe is read. InputError if refused."""

    def check_layer(self, spec, out_features: int, in_features: int, where: str) -> None:
        """Limits of a spec on a layer's shape, checked before any work. InputError if refused."""

    @property
    def needs_hessian(self) -> bool:
        return self.calibration is Calibration.NEEDS

    @property
    def uses_calibration(self) -> bool:
        return self.calibration is not Calibration.IGNORES

    @classmethod
    def option_fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls.Options)

    def options(self, spec):
        """The spec's options as the typed Options (values already checked by `check_options`)."""
        return self.Options(**spec.options)

    def check_options(self, options: dict, where: str) -> None:
        """Refuse an option the method does not have, or a value its check refuses: one-line InputError.
        Values must have their YAML type: a quoted "false" is not a boolean, `true` is not an integer."""
        fields = {f.name: f for f in self.option_fields()}
        for k, v in options.items():
            if k not in fields:
                takes = f"{self.name} options: {', '.join(sorted(fields))}" if fields else f"{self.name} takes no options"
                raise InputError(f"{where}: {self.name} does not use {k} ({takes})")
            ok, what = fields[k].metadata["check"]
            if not ok(v):
                raise InputError(f"{where}: option {k} must be {what}, got {v!r}")


METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: one instance of the method in METHODS, under its name."""
    for attr in ("name", "format", "bit_widths", "calibration", "uses_fields"):
        if not hasattr(cls, attr):
            raise TypeError(f"method {cls.__name__} does not declare {attr}")
    if not dataclasses.is_dataclass(cls.Options) or any("doc" not in f.metadata for f in dataclasses.fields(cls.Options)):
        raise TypeError(f"method {cls.__name__}: Options must be a dataclass of option(...) fields")
    METHODS[cls.name] = cls()
    return cls
