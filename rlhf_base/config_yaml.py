"""A YAML loader that remembers where each key was written, for config errors that say file and line.

`rlhf_base.config` turns what this reads into typed dataclasses; this module only reads: a YAML file or a
`key=value` override into nested mappings (`_Node`) that record, for each key, "in x.yaml line 3" or
"in override 'seed=3'", and merges them in order. Unlike PyYAML's YAML 1.1 default, `1e-4` reads as a
float rather than the string "1e-4".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key, where it was set, and what is valid."""


# --------------------------------------------------------------------------------------------------------
# A YAML loader that remembers where each key was written
# --------------------------------------------------------------------------------------------------------
class _Node(dict):
    """A YAML mapping that also records, for each key, where it was set (``"in x.yaml line 3"``)."""

    def __init__(self) -> None:
        super().__init__()
        self.where: dict[Any, str] = {}


class _Loader(yaml.SafeLoader):
    """SafeLoader building :class:`_Node` mappings, rejecting duplicate keys, reading ``1e-4`` as a float."""

    describe: Callable[[int], str] = staticmethod(lambda line: f"line {line}")


# PyYAML follows YAML 1.1, where a float needs a dot and a signed exponent ("1.0e-4"), so "1e-4" and "1.0e5"
# would load as strings; accept them as floats, as YAML 1.2 and every config author expect (yaml/pyyaml#173).
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> Iterable[_Node]:
    data = _Node()
    yield data  # yielded first, as SafeConstructor does, so recursive anchors resolve
    explicit = {id(key) for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge"}
    loader.flatten_mapping(node)  # expand "<<: *anchor" merge keys; explicit keys come after and win
    first_line: dict[Any, int] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise ConfigError(f"unhashable key {key!r} {loader.describe(line)}") from None
        if id(key_node) in explicit:
            if key in first_line:
                first = loader.describe(first_line[key])
                raise ConfigError(f"duplicate key {key!r} {loader.describe(line)} (first set {first})")
            first_line[key] = line
        data[key] = loader.construct_object(value_node, deep=True)
        data.where[key] = loader.describe(line)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def _parse_yaml(text: str, describe: Callable[[int], str], name: str, has_lines: bool = True) -> Any:
    """Parse ``text`` with :class:`_Loader`; syntax errors become a :class:`ConfigError` naming the line.

    ``describe(line)`` says where a key was written (``"in x.yaml line 3"``); ``name`` is the source for
    syntax errors, whose line is reported when ``has_lines`` (a file) and only the column otherwise.
    """
    loader = _Loader(text)
    loader.describe = describe
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark, context_mark = e.problem_mark or e.context_mark, e.context_mark

        def at(m: yaml.Mark) -> str:
            return (
                f"line {m.line + 1}, column {m.column + 1}" if has_lines else f"value column {m.column + 1}"
            )

        where = f" {at(mark)}" if has_lines and mark else f" ({at(mark)})" if mark else ""
        problem = str(e.problem or e.context)
        if e.context and e.problem:
            problem += f" ({e.context}" + (f" started at {at(context_mark)})" if context_mark else ")")
        raise ConfigError(f"invalid YAML in {name}{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {name}: {e}") from None
    finally:
        loader.dispose()


def _read_file(path: Path) -> _Node:
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}" + (" (it is a directory)" if path.is_dir() else "")
        )
    data = _parse_yaml(path.read_text(encoding="utf-8"), lambda line: f"in {path} line {line}", str(path))
    if data is None:
        return _Node()  # an empty file overrides nothing
    if not isinstance(data, _Node):
        raise ConfigError(
            f"{path} must hold a mapping of config keys to values (key: value lines), "
            f"got a {type(data).__name__}: {repr(data)[:80]}"
        )
    return data


_OVERRIDE_FORM = "KEY=VALUE with a dotted KEY, e.g. 'agent.learning_rate=1e-5' or 'seed=3'"


def _parse_override(text: str) -> _Node:
    """``"a.b.c=value"`` as the nested mapping ``{a: {b: {c: value}}}``, value parsed as YAML."""
    if not isinstance(text, str):
        raise ConfigError(f"override {text!r} is not a string; expected {_OVERRIDE_FORM}")
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"malformed override {text!r}: expected {_OVERRIDE_FORM}")
    where = f"in override {text!r}"
    value = _parse_yaml(raw, lambda _line: where, f"override {text!r}", has_lines=False)
    for part in reversed(parts):
        node = _Node()
        node[part.strip()] = value
        node.where[part.strip()] = where
        value = node
    return value


def _merge(base: _Node, new: _Node) -> None:
    """Merge ``new`` into ``base`` in place: mappings merge key by key, anything else replaces."""
    for key, value in new.items():
        if isinstance(value, _Node) and isinstance(base.get(key), _Node):
            _merge(base[key], value)
        else:
            base[key] = value
        base.where[key] = new.where[key]


# --------------------------------------------------------------------------------------------------------
# Checking values against type annotations
# --------------------------------------------------------------------------------------------------------
