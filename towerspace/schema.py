"""A small schema engine: frozen dataclasses built from plain data, with one-line errors.

Plain data is what YAML, JSON and --set values give: mappings, lists, strings, numbers, bools,
None. `build(cls, data, where)` makes a `cls` from it, every value coerced to its field's type
and checked against its field's metadata; `rebuild` makes again only the fields at some dotted
paths. The engine knows nothing of what the dataclasses describe.

Field types: bool, int, float, str, Any, `T | None`, `tuple[T, ...]`, `dict[str, T]` and another
such dataclass. A bool is not an int; a float field takes an int, and YAML 1.1's `1e-3` (which
PyYAML reads as text); no float field takes inf or nan.

Field metadata (`dataclasses.field(metadata={...})`):

    choices  the allowed values, in the order the error lists them
    min      the smallest allowed number (inclusive)
    max      the largest allowed number (inclusive)
    gt       what the number must be greater than (an exclusive lower bound)
    parse    a function (value, where, path) -> value that reads the field instead of its type:
             a shorthand, or a type this engine does not know; choices and bounds still apply

Errors are ConfigError, one line: `where: path: problem`. `where` is what the data came from (a
file, a --set argument), `path` the dotted field, and the problem names the value as YAML writes
it, what is allowed and, for a mistyped word, the nearest allowed one ("did you mean").

Dotted paths name a field through nested dataclasses ("train.epochs"); past a dict field the rest
of the path is one key, dots and all ("model.overrides.middle.block1" is key "middle.block1").
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from towerspace.errors import ConfigError

FLOAT_TEXT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")  # 1e-3: a str to PyYAML

# ---------------------------------------------------------------- wording


def fail(where: str, path: str, problem: str) -> typing.NoReturn:
    """Raise the one-line ConfigError `where: path: problem` (empty parts left out)."""
    raise ConfigError(": ".join(part for part in (where, path, problem) if part))


def did_you_mean(word: str, options: Sequence[str]) -> str:
    """The hint "did you mean 'x'? " for the option closest to a mistyped word, or ""."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def show(value: Any) -> str:
    """A value as the user wrote it in YAML: 'text', true, null, 0.5."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _range(meta: Mapping[str, Any]) -> str:
    if "min" in meta and "max" in meta:
        return f"{show(meta['min'])} to {show(meta['max'])}"
    bounds = (("gt", ">"), ("min", ">="), ("max", "<="))
    return " and ".join(f"{sign} {show(meta[key])}" for key, sign in bounds if key in meta)


def check_meta(value: Any, meta: Mapping[str, Any], where: str, path: str) -> None:
    """Refuse a value outside its field's choices or bounds (None is always allowed here)."""
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        hint = did_you_mean(str(value), meta["choices"])
        allowed = f"(allowed: {', '.join(meta['choices'])})"
        fail(where, path, f"{show(value)} is not allowed; {hint}{allowed}" if hint
                          else f"{show(value)} is not allowed {allowed}")  # fmt: skip
    if isinstance(value, bool) or not isinstance(value, int | float):
        return
    low_ok = value >= meta.get("min", value) and ("gt" not in meta or value > meta["gt"])
    if not low_ok or value > meta.get("max", value):
        fail(where, path, f"{show(value)} is out of range; allowed: {_range(meta)}")


# ---------------------------------------------------------------- coercion


def is_int(value: Any) -> bool:
    """Whether value is an integer (NumPy's included), and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_float(value: Any) -> float | None:
    """value as a float if it is a number (or YAML 1.1's '1e-3' string), else None."""
    if isinstance(value, str) and FLOAT_TEXT.match(value):
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer of hundreds of digits
            return math.inf if value > 0 else -math.inf
    return None


def unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(T, True) for `T | None`, (hint, False) otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        (inner,) = [a for a in args if a is not type(None)]
        return inner, type(None) in args
    return hint, False


def _coerce_scalar(hint: Any, value: Any, where: str, path: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            fail(where, path, f"expected true or false, got {show(value)}")
        return value
    if hint is int:
        if not is_int(value):
            fail(where, path, f"expected an integer, got {show(value)}")
        return int(value)
    if hint is float:
        number = as_float(value)
        if number is None:
            fail(where, path, f"expected a number, got {show(value)}")
        if not math.isfinite(number):  # .inf, .nan, 1e400
            fail(where, path, f"expected a finite number, got {show(number)}")
        return number
    if not isinstance(value, str):
        fail(where, path, f"expected a string, got {show(value)}")
    return str(value)


def coerce(hint: Any, value: Any, where: str, path: str) -> Any:
    """value as the type `hint` names, or a ConfigError saying what was expected."""
    hint, optional = unwrap_optional(hint)
    if value is None and optional:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where, path)
    if hint is Any:
        return value
    if hint in (bool, int, float, str):
        return _coerce_scalar(hint, value, where, path)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            fail(where, path, f"expected a list, got {show(value)}")
        return tuple(coerce(args[0], v, where, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            fail(where, path, f"expected a mapping, got {show(value)}")
        return {str(k): coerce(args[1], v, where, f"{path}.{k}") for k, v in value.items()}
    raise TypeError(f"no validation for {hint!r}")  # a programming error, not a user's


# ---------------------------------------------------------------- dataclasses


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """A dataclass's field types, evaluated once per class (read them, never change them)."""
    return typing.get_type_hints(cls)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _field_value(f: dataclasses.Field, hint: Any, value: Any, where: str, path: str) -> Any:
    """One field's value read (by its `parse`, else by its type) and checked."""
    parse = f.metadata.get("parse")
    value = parse(value, where, path) if parse else coerce(hint, value, where, path)
    check_meta(value, f.metadata, where, path)
    return value


def build(cls: type, data: Any, where: str, path: str = "") -> Any:
    """A dataclass instance from a mapping, every field checked against its type and metadata
    in field order (an instance of cls is taken as it is)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        fail(where, path, f"expected a mapping of fields, got {show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            hint = did_you_mean(str(key), list(fields))
            allowed = f"(allowed: {', '.join(sorted(fields))})"
            fail(where, _join(path, str(key)), f"unknown field; {hint}{allowed}" if hint
                                               else f"unknown field {allowed}")  # fmt: skip
    hints = type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                fail(where, _join(path, name), "missing (required)")
            continue
        values[name] = _field_value(f, hints[name], data[name], where, _join(path, name))
    return cls(**values)


def rebuild(obj: Any, data: Mapping[str, Any], paths: Sequence[str], where: str,
            path: str = "") -> Any:  # fmt: skip
    """A copy of a dataclass instance with the fields at `paths` built again from `data` (the
    plain form of the whole instance, as build() reads it), in field order; others are kept."""
    hints = type_hints(type(obj))
    changes = {}
    for f in dataclasses.fields(obj):
        sub = _join(path, f.name)
        inside = [p for p in paths if p.startswith(f"{sub}.")]
        nested = dataclasses.is_dataclass(unwrap_optional(hints[f.name])[0])
        if sub in paths or (inside and not nested):  # the field, or a key of its dict
            changes[f.name] = _field_value(f, hints[f.name], data[f.name], where, sub)
        elif inside:
            changes[f.name] = rebuild(getattr(obj, f.name), data[f.name], inside, where, sub)
    return dataclasses.replace(obj, **changes)


# ---------------------------------------------------------------- dotted paths


def field_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted field path of a dataclass, its nested dataclasses' fields included."""
    paths, hints = [], type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = f"{prefix}{f.name}"
        paths.append(sub)
        if dataclasses.is_dataclass(hints[f.name]):
            paths += field_paths(hints[f.name], sub + ".")
    return paths


def split_path(cls: type, key: str) -> list[str]:
    """The parts of a dotted path through cls's fields; past a dict field the rest is one key."""
    parts, hint = key.split("."), cls
    for i, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(hint) or part not in (hints := type_hints(hint)):
            break
        hint = unwrap_optional(hints[part])[0]
        if typing.get_origin(hint) is dict:
            return [*parts[: i + 1], ".".join(parts[i + 1 :])]
    return parts


def field_hint(cls: type, key: str) -> Any:
    """The type of what a dotted path names (a dict's value type past a dict field), without
    its `| None`."""
    hint: Any = cls
    for part in split_path(cls, key):
        if typing.get_origin(hint) is dict:
            hint = typing.get_args(hint)[1]
        else:
            hint = type_hints(hint)[part]
    return unwrap_optional(hint)[0]


def set_path(data: dict[str, Any], parts: Sequence[str], value: Any) -> None:
    """Set a path's parts in nested dicts, making (or replacing) the mappings on the way."""
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        child = dict(child) if isinstance(child, Mapping) else {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def overlaps(path: str, other: str) -> bool:
    """Whether two dotted paths name the same field, or one lies inside the other."""
    return path == other or path.startswith(f"{other}.") or other.startswith(f"{path}.")
