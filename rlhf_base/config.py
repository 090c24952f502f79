"""YAML into typed config dataclasses, with errors that name the problem.

Each component (env, agent, reward model) owns one ``@dataclass`` config whose fields carry defaults and a
comment each (STYLE.md guideline 3). A YAML file in ``configs/`` and ``key=value`` overrides on the command
line only *override* those fields; this module does that generically and checks every value against the
field's type annotation, so a typo fails at start-up with the file and line instead of being silently
ignored or crashing an hour into training::

    cfg = load_config(TrainConfig, "my_run.yaml", ["agent.learning_rate=1e-5", "seed=3"])

Precedence, lowest first: dataclass defaults, then the YAML file, then the overrides in order. A mapping
given for a nested dataclass field merges key by key into what came before; any other value replaces it.
Each dataclass is constructed once, from the merged result, so ``__post_init__`` checks see the final
values and a YAML value fixed by an override never trips them.

A field that was renamed stays known to the loader: the dataclass lists it in a class attribute
``RENAMED: ClassVar[dict[str, str]] = {"lr": "learning_rate"}`` (old name -> new name), and a file, override
or mapping that still uses the old name fails with the new one in the message, rather than "unknown key".

Checked types: ``int``, ``float`` (ints accepted), ``bool`` (only YAML booleans, not ``1`` or ``"yes"``
strings), ``str``, ``Path``, enums, ``Literal[...]``, ``X | None`` and other unions, ``list[...]``,
``tuple[...]``, ``dict[..., ...]`` and nested dataclasses. ``Any`` or unannotated fields take any value.
Unlike PyYAML's YAML 1.1 default, ``1e-4`` reads as a float rather than the string ``"1e-4"``.

A setting that moved to another component stays named in its old config as a ``MOVED_KEYS`` class
variable (``{"beta": "set env.beta instead"}``): setting it is an error that says where it lives now.

A number's valid range is a ``RANGES`` class variable (``{"learning_rate": Range(gt=0)}``, see
:mod:`rlhf_base.ranges`): each value is checked as it is read, and an error names the class, the field, the
value, where it was set and the range, e.g. ``ReinforceConfig.max_grad_norm = -1.0 in override
'max_grad_norm=-1': must be > 0 (valid range (0, inf))``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import math
import types
import typing
from collections import abc
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePath
from typing import Any, Literal, TypeVar, Union

import yaml

from rlhf_base.config_yaml import ConfigError, _merge, _Node, _parse_override, _read_file
from rlhf_base.io import atomic_write
from rlhf_base.ranges import Range, check_ranges, range_problem, range_text

__all__ = [
    "ConfigError",
    "Range",
    "check_ranges",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
]

T = TypeVar("T")


class _Mismatch(Exception):
    """A value is not of the expected type; the caller turns it into a ConfigError naming key and place."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail


_UNION_TYPES = (Union, types.UnionType)


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return type(value).__name__


def _short(value: Any) -> str:
    text = repr(_plain(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(tp: Any, in_union: bool = False) -> str:
    """A readable name for an annotation: ``float``, ``list[int]``, ``one of 'a', 'b'``, ``int | None``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if tp is type(None) or tp is None:
        return "None"
    if origin is Literal:
        choices = [repr(a) for a in args]
        return " | ".join(choices) if in_union else "one of " + ", ".join(choices)
    if origin in _UNION_TYPES:
        return " | ".join(_type_name(a, in_union=True) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a, in_union=True) for a in args)
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{inner}]" if args else name
    if isinstance(tp, type):
        if dataclasses.is_dataclass(tp):
            return f"a mapping of {tp.__name__} fields"
        return tp.__name__
    return str(tp)


def _convert(value: Any, tp: Any, current: Any, path: str, where: str) -> Any:
    """Return ``value`` checked against (and lightly converted to) annotation ``tp``.

    Raises :class:`_Mismatch` when the value is of the wrong type, and :class:`ConfigError` for problems
    inside a nested dataclass, which already carry their own key and place.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return _plain(value)
    if tp is type(None) or tp is None:
        if value is None:
            return None
        raise _Mismatch()
    if origin in _UNION_TYPES:
        if value is None and type(None) in args:
            return None
        details = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, current, path, where)
            except _Mismatch as m:
                if m.detail:
                    details.append(m.detail)
        raise _Mismatch("; ".join(details))
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        close = (
            difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            if isinstance(value, str)
            else []
        )
        raise _Mismatch(f"did you mean {close[0]!r}?" if close else "")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch()
        base = current if isinstance(current, tp) else None
        return _build(tp, _as_node(value, where), path, base)
    if origin in (list, tuple, set, frozenset, abc.Sequence, abc.MutableSequence):
        return _convert_sequence(value, origin, args, path, where)
    if origin in (dict, abc.Mapping, abc.MutableMapping):
        if not isinstance(value, Mapping):
            raise _Mismatch()
        key_tp, value_tp = args if len(args) == 2 else (Any, Any)
        out = {}
        for key, item in value.items():
            try:
                k = _convert(key, key_tp, None, path, where)
                v = _convert(item, value_tp, None, f"{path}.{key}", where)
            except _Mismatch as m:
                raise _Mismatch(f"entry {key!r}: {item!r}" + (f" ({m.detail})" if m.detail else "")) from None
            out[k] = v
        return out
    if origin is not None:
        return _plain(value)  # an annotation we do not model (Callable, ...): trust the author
    return _convert_simple(value, tp)


def _convert_sequence(value: Any, origin: Any, args: tuple[Any, ...], path: str, where: str) -> Any:
    if not isinstance(value, (list, tuple)):
        raise _Mismatch()
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        if len(value) != len(args):
            raise _Mismatch(f"needs exactly {len(args)} items, got {len(value)}")
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(value)
    items = []
    for i, (item, item_tp) in enumerate(zip(value, item_types, strict=True)):
        try:
            items.append(_convert(item, item_tp, None, f"{path}[{i}]", where))
        except _Mismatch as m:
            raise _Mismatch(f"item {i} is {item!r}" + (f" ({m.detail})" if m.detail else "")) from None
    if origin in (tuple, set, frozenset):
        return origin(items)
    return items


def _convert_simple(value: Any, tp: Any) -> Any:
    """Check a plain class: the numeric tower without bool, str-like paths, enums by value or name."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch("use true or false" if value in (0, 1, "0", "1") or isinstance(value, str) else "")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch()
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch("quote it to make it a string" if isinstance(value, (int, float, bool)) else "")
    if isinstance(tp, type) and issubclass(tp, PurePath):
        if isinstance(value, (str, PurePath)):
            return tp(value)
        raise _Mismatch()
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name or value is member:
                return member
        names = [repr(m.value) for m in tp]
        raise _Mismatch(f"valid values: {', '.join(names)}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return _plain(value)
        raise _Mismatch()
    return _plain(value)  # a TypeVar, a string annotation that did not resolve, ...: trust the author


def _has_non_finite(value: Any) -> bool:
    """A NaN or infinite float anywhere in a converted value (a `float` field, a list of betas...).

    YAML reads `.nan` and `.inf`, and `float("nan")` compares false with every bound, so a NaN learning rate
    would pass a `> 0` check and train nothing; a dataclass that means infinity lists the field in
    `NON_FINITE_OK`."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(_has_non_finite(v) for v in value)
    if isinstance(value, Mapping):
        return any(_has_non_finite(v) for v in value.values())
    return False


def _as_node(value: Mapping[Any, Any], where: str) -> _Node:
    if isinstance(value, _Node):
        return value
    node = _Node()
    for key, item in value.items():
        node[key] = item
        node.where[key] = where
    return node


def _plain(value: Any) -> Any:
    """Strip :class:`_Node` (a dict subclass YAML dumpers reject) from values stored as they came."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------------
# Building dataclasses
# --------------------------------------------------------------------------------------------------------
@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of ``cls``'s init fields; ``get_type_hints`` resolves postponed (string) ones."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a name only imported under TYPE_CHECKING: check what resolves, trust the rest
        hints = {}
    return {
        f.name: hints.get(f.name, Any if isinstance(f.type, str) else f.type)
        for f in dataclasses.fields(cls)
        if f.init
    }


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _build(
    cls: type[T], node: _Node, path: str, base: T | None, moved_keys: Mapping[str, str] | None = None
) -> T:
    """Instantiate ``cls`` from ``node``; fields absent from ``node`` keep ``base``'s values or defaults."""
    types_ = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    section = f"'{path}' ({cls.__name__})" if path else cls.__name__
    renamed: Mapping[str, str] = getattr(cls, "RENAMED", {})
    # key -> where that setting lives now: the caller's (e.g. the env's settings for any agent), then `cls`'s
    moved = {**(moved_keys or {}), **getattr(cls, "MOVED_KEYS", {})}
    for key in node:
        if key in moved and key not in types_:
            dotted = f"{path}.{key}" if path else str(key)
            raise ConfigError(
                f"key '{dotted}' {node.where[key]} is not a {cls.__name__} setting: {moved[key]}"
            )
        if key not in types_:
            dotted = f"{path}.{key}" if path else str(key)
            if key in renamed:
                new = f"{path}.{renamed[key]}" if path else renamed[key]
                raise ConfigError(
                    f"'{dotted}' was renamed to '{new}' in {cls.__name__}: change it {node.where[key]}"
                )
            at = f" at '{dotted}'" if path else ""
            close = difflib.get_close_matches(str(key), list(types_), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown key {key!r}{at} {node.where[key]}{hint}; valid keys for {section}: "
                + ", ".join(types_)
            )
    kwargs = {}
    for key, value in node.items():
        dotted = f"{path}.{key}" if path else key
        current = getattr(base, key) if base is not None else _default(fields[key])
        valid = range_text(cls, key)
        valid = f"; valid range {valid}" if valid else ""
        try:
            kwargs[key] = _convert(value, types_[key], current, dotted, node.where[key])
        except _Mismatch as m:
            raise ConfigError(
                f"bad value for '{dotted}' {node.where[key]}: expected {_type_name(types_[key])}, "
                f"got {_short(value)} ({_kind(value)})" + (f"; {m.detail}" if m.detail else "") + valid
            ) from None
        if _has_non_finite(kwargs[key]) and key not in getattr(cls, "NON_FINITE_OK", ()):
            raise ConfigError(
                f"bad value for '{dotted}' {node.where[key]}: {_short(value)} holds a NaN or infinity; "
                "settings must be finite numbers" + valid
            )
        out_of_range = range_problem(cls, key, kwargs[key])
        if out_of_range is not None:  # the field's declared `RANGES` entry (rlhf_base.ranges)
            subject, problem = out_of_range
            at = f" at '{dotted}'" if dotted != key else ""
            raise ConfigError(f"{cls.__name__}.{subject}{at} {node.where[key]}: {problem}")
    if base is None:
        missing = [
            name
            for name, f in fields.items()
            if name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(
                f"missing required key(s) for {section}: {', '.join(missing)} (these fields have no default)"
            )
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a __post_init__ check of the author's
        sources = sorted(set(node.where.values()))
        set_by = f" (values set {', '.join(sources)})" if sources else ""
        raise ConfigError(f"invalid config for {section}{set_by}: {e}") from e


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    moved_keys: Mapping[str, str] | None = None,
) -> T:
    """Build ``cls`` from its defaults, a YAML file, then dotted-key overrides, checking every value.

    Args:
        cls: A ``@dataclass`` type whose fields have defaults; fields typed as dataclasses nest.
        path: YAML file holding a mapping that overrides fields (nested mappings for nested configs), or
            ``None`` for defaults plus overrides only.
        overrides: Strings ``"a.b.c=value"``, applied after the file, in order; ``value`` is parsed as YAML,
            so ``3``, ``0.1``, ``1e-5``, ``true``, ``[1, 2]`` and ``null`` mean what they say.

    Returns:
        A new ``cls`` instance.

    Raises:
        ConfigError: The file is missing, not valid YAML or not a mapping; a key is unknown (the message
            gives its dotted path, file and line, the closest valid key and all valid keys) or was renamed
            (the message gives the new name, file and line); a value has the wrong type (the message gives
            key, place, expected type and value) or lies outside its declared range (``RANGES``: the
            message gives key, value, place and range); an override lacks ``=``; or the dataclass's own
            ``__post_init__`` rejected the result.
        TypeError: ``cls`` is not a dataclass type.

    ``moved_keys`` (top-level key -> where that setting lives now) adds to the class's own ``MOVED_KEYS``:
    a caller can say for any class, a user's included, that a key belongs to another config.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"load_config needs a dataclass type, got {cls!r}")
    if isinstance(overrides, str):
        overrides = [overrides]  # one override, not one per character
    tree = _read_file(Path(path)) if path is not None else _Node()
    for text in overrides:
        _merge(tree, _parse_override(text))
    return _build(cls, tree, "", None, moved_keys)


def config_from_dict(
    cls: type[T],
    values: Mapping[str, Any],
    where: str = "in a mapping",
    moved_keys: Mapping[str, str] | None = None,
) -> T:
    """Build ``cls`` from defaults and a (nested) mapping, with the same checks and errors as ``load_config``.

    For configs given in code, e.g. ``make_agent("ppo", envs, {"learning_rate": 1e-4})``; ``where`` names the source.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"config_from_dict needs a dataclass type, got {cls!r}")
    return _build(cls, _as_node(values, where), "", None, moved_keys)


# --------------------------------------------------------------------------------------------------------
# Writing configs back out
# --------------------------------------------------------------------------------------------------------
def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, enum.Enum):
        return _to_plain(value.value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        return {_to_plain(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_to_plain(v) for v in value]
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain dicts, lists, strings and numbers, ready for YAML or JSON.

    Only ``__init__`` fields are written, never properties: derived values are recomputed on load, so the
    file can be fed back to :func:`load_config` and gives an equal config.
    """
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {type(cfg).__name__}")
    return {f.name: _to_plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically, e.g. into a run folder so the run can be repeated."""
    header = f"# Resolved {type(cfg).__name__}: every field, defaults included.\n"
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True, default_flow_style=False)
    atomic_write(path, header + body)
