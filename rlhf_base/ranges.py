"""The valid range of every number a config holds, declared once per dataclass and checked everywhere.

A config dataclass lists a `Range` for each numeric field in a class variable, next to `RENAMED`::

    @dataclass
    class MyConfig:
        RANGES: ClassVar[dict[str, Range]] = {
            "learning_rate": Range(gt=0),
            "ema_decay": Range(ge=0, le=1),
            "minibatch_size": Range(ge=1),  # an `int | None` field: None stays allowed
            "betas": Range(ge=0),  # a `list[float]` field: each item is checked
            "offset": Range.any("a shift: negative, zero and positive all mean something"),
        }
        learning_rate: float = 3e-4
        ...

        def __post_init__(self) -> None:
            check_ranges(self)  # first, so a cross-field check below sees numbers in range

Two places check it: `check_ranges` in `__post_init__` (so `MyConfig(learning_rate=-1)` fails in Python),
and `rlhf_base.config`'s loader, key by key as it reads a file or an override (so the error names the file
and line). A subclass adds to its bases' `RANGES` (they merge along the MRO). A config without `RANGES`
(a user's agent, say) is checked for types only, as before.

The error says the field, the value and the range, e.g.
`ReinforceConfig.max_grad_norm = -1: must be > 0 (valid range (0, inf))`. Floats must also be finite
(NaN lies in no range) unless the dataclass lists the field in `NON_FINITE_OK`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Union

from rlhf_base.config_yaml import ConfigError

__all__ = [
    "SEED",
    "Range",
    "check_ranges",
    "declared_ranges",
    "numeric_fields",
    "range_problem",
    "range_text",
]


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts: `gt`/`ge` a lower bound, `lt`/`le` an upper one (None: unbounded).

    `Range.any(reason)` declares that every finite value is valid; the reason says why (a field with no
    bounds and no reason would be indistinguishable from one whose range was forgotten).
    """

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    reason: str = ""  # why any value is fine, for a Range with no bounds

    def __post_init__(self) -> None:
        if self.gt is not None and self.ge is not None or self.lt is not None and self.le is not None:
            raise TypeError("a Range takes one lower bound (gt or ge) and one upper bound (lt or le)")
        if self.unbounded and not self.reason:
            raise TypeError("a Range without bounds needs a reason: Range.any('why every value is valid')")

    @classmethod
    def any(cls, reason: str) -> Range:
        """Every finite value is valid, because `reason`."""
        return cls(reason=reason)

    @property
    def unbounded(self) -> bool:
        return self.gt is None and self.ge is None and self.lt is None and self.le is None

    @property
    def lower(self) -> float | None:
        return self.gt if self.gt is not None else self.ge

    @property
    def upper(self) -> float | None:
        return self.lt if self.lt is not None else self.le

    def contains(self, value: float) -> bool:
        """Whether `value` lies in the range (NaN never does)."""
        if math.isnan(value):
            return False
        return (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
        )

    def interval(self) -> str:
        """The range in interval notation: `(0, inf)`, `[0, 1]`, `[1, inf)`."""
        low = "(-inf" if self.lower is None else ("(" if self.gt is not None else "[") + _number(self.lower)
        high = "inf)" if self.upper is None else _number(self.upper) + (")" if self.lt is not None else "]")
        return f"{low}, {high}"

    def condition(self) -> str:
        """The bounds as a requirement: `> 0`, `>= 0 and < 0.5`, `any finite number`."""
        bounds = ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
        kept = [f"{op} {_number(bound)}" for op, bound in bounds if bound is not None]
        return " and ".join(kept) if kept else "any finite number"


#: Every `seed` field's range: numpy's legacy `np.random.seed`, which a sweep cell calls with it, takes
#: [0, 2**32); `np.random.default_rng` refuses negative seeds.
SEED = Range(ge=0, lt=2**32)


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))


# --------------------------------------------------------------------------------------------------------
# Which fields are numbers, and what each declares
# --------------------------------------------------------------------------------------------------------
_UNIONS = (Union, types.UnionType)


@dataclass(frozen=True)
class _Shape:
    """A numeric field's annotation: `int` or `float`, optionally `| None`, optionally a list of them."""

    kind: type  # int or float
    optional: bool
    sequence: bool


def _shape(annotation: Any) -> _Shape | None:
    """The numeric shape of an annotation, or None for one that holds no plain numbers."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in (int, float):
        return _Shape(annotation, optional=False, sequence=False)
    if origin in _UNIONS:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            inner = _shape(rest[0])
            return dataclasses.replace(inner, optional=True) if inner and not inner.sequence else None
        return None
    if origin in (list, tuple) and args:
        items = {a for a in args if a is not Ellipsis}
        if len(items) == 1 and (item := items.pop()) in (int, float):
            return _Shape(item, optional=False, sequence=True)
    return None


@functools.cache
def _shapes(cls: type) -> dict[str, _Shape]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a name only imported under TYPE_CHECKING: such a config declares no ranges
        return {}
    shapes = {f.name: _shape(hints.get(f.name)) for f in dataclasses.fields(cls) if f.init}
    return {name: shape for name, shape in shapes.items() if shape is not None}


def numeric_fields(cls: type) -> list[str]:
    """The fields of dataclass `cls` that hold numbers: `int`, `float`, either `| None`, or lists of them."""
    return list(_shapes(cls))


@functools.cache
def declared_ranges(cls: type) -> dict[str, Range]:
    """`cls`'s `RANGES`, merged with its bases' (a subclass's entry wins); checked against its fields.

    Raises:
        TypeError: an entry names no numeric field of `cls`, or is not a `Range` (the config's author's
            mistake, caught by the first use rather than silently skipped).
    """
    merged: dict[str, Range] = {}
    for klass in reversed(cls.__mro__):
        merged.update(vars(klass).get("RANGES", {}))
    shapes = _shapes(cls)
    for name, declared in merged.items():
        if not isinstance(declared, Range):
            raise TypeError(f"{cls.__name__}.RANGES[{name!r}] must be a Range, got {declared!r}")
        if name not in shapes:
            raise TypeError(
                f"{cls.__name__}.RANGES names {name!r}, which is not a numeric field (int, float, "
                f"either | None, or a list of them) of {cls.__name__}"
            )
    return merged


def range_text(cls: type, name: str) -> str | None:
    """The valid range of field `name` for a message, e.g. `(0, inf)` or `[1, inf) or None`; None if undeclared."""
    declared = declared_ranges(cls).get(name)
    if declared is None:
        return None
    if declared.unbounded:
        return f"any finite number: {declared.reason}"
    return declared.interval() + (", or None" if _shapes(cls)[name].optional else "")


# --------------------------------------------------------------------------------------------------------
# Checking values
# --------------------------------------------------------------------------------------------------------
def _kind(shape: _Shape) -> str:
    return "an int" if shape.kind is int else "a float"


def _item_problem(value: Any, shape: _Shape, declared: Range, finite: bool) -> str | None:
    number = Integral if shape.kind is int else Real
    if isinstance(value, bool) or not isinstance(value, number):
        return f"must be {_kind(shape)}"
    if finite and not math.isfinite(value):
        return "must be a finite number" + ("" if declared.unbounded else f" {declared.condition()}")
    if not declared.contains(value):
        return f"must be {declared.condition()}"
    return None


def range_problem(cls: type, name: str, value: Any) -> tuple[str, str] | None:
    """What is wrong with `value` for field `name` of `cls`, or None if it is valid (or nothing is declared).

    Returns:
        `(subject, problem)`: `subject` is `"name = value"` (`"name[i] = item"` for an item of a list) and
        `problem` e.g. `"must be > 0 (valid range (0, inf))"`.
    """
    declared = declared_ranges(cls).get(name)
    if declared is None:
        return None
    shape = _shapes(cls)[name]
    finite = name not in getattr(cls, "NON_FINITE_OK", ())
    valid = f" (valid range {range_text(cls, name)})"
    if value is None:
        return None if shape.optional else (f"{name} = None", f"must be {_kind(shape)}{valid}")
    if shape.sequence:
        if not isinstance(value, (list, tuple)):
            return f"{name} = {value!r}", f"must be a list of {shape.kind.__name__}s" + valid
        for i, item in enumerate(value):
            if problem := _item_problem(item, shape, declared, finite):
                return f"{name}[{i}] = {item!r}", problem + valid
        return None
    if problem := _item_problem(value, shape, declared, finite):
        return f"{name} = {value!r}", problem + valid
    return None


def check_ranges(config: Any) -> None:
    """Check every field of `config` that its class's `RANGES` declares; call it first in `__post_init__`.

    Raises:
        ConfigError: (a ValueError) naming the class, the field, the value and the valid range, e.g.
            `PPOConfig.max_grad_norm = -1: must be > 0 (valid range (0, inf))`.
    """
    cls = type(config)
    for name in declared_ranges(cls):
        found = range_problem(cls, name, getattr(config, name))
        if found is not None:
            subject, problem = found
            raise ConfigError(f"{cls.__name__}.{subject}: {problem}")
