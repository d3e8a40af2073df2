"""Strict loading of params.yaml sections into frozen dataclasses.

Each module that owns a stage declares the dataclass for its section (e.g. `train.TrainParams`); this module
only knows how to check a YAML mapping against such a dataclass. An unknown key, a missing key or a wrongly typed
value raises `ParamsError` naming the section, the key and what is allowed, so a typo in params.yaml (or in a
`dvc exp run -S` override) fails at the start of a stage instead of silently training with a default.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from pipeline.errors import UserError

T = TypeVar("T")
DEFAULT_PARAMS = "params.yaml"


class ParamsError(UserError, ValueError):
    """params.yaml does not match the schema of a section."""


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: file not found (run from the repository root, or pass --params)")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_section(cls: type[T], section: str, path: str | Path = DEFAULT_PARAMS) -> T:
    """Read `section` of the params file at `path` into the frozen dataclass `cls`."""
    data = read_yaml(path)
    if section not in data:
        raise ParamsError(f"{path}: missing section '{section}'; present: {', '.join(sorted(data)) or 'none'}")
    return from_dict(cls, data[section], where=section, source=str(path))


def from_dict(cls: type[T], data: Any, where: str, source: str = DEFAULT_PARAMS) -> T:
    """Build dataclass `cls` from a plain mapping, checking every key and type. `where` is the dotted key path."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: '{where}' must be a mapping, got {_describe(data)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(
            f"{source}: unknown key '{where}.{unknown[0]}'"
            + (f" (and {unknown[1:]})" if unknown[1:] else "")
            + f"; allowed keys in '{where}': {', '.join(fields)}"
        )
    values = {}
    for name, field in fields.items():
        key = f"{where}.{name}"
        if name not in data:
            has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
            if has_default:  # only structural defaults (nested sections); scientific values have none
                continue
            raise ParamsError(f"{source}: missing key '{key}' ({_type_name(hints[name])})")
        values[name] = _check(hints[name], data[name], key, source)
    return cls(**values)


def to_dict(obj: Any) -> Any:
    """Inverse of `from_dict`: a frozen dataclass back to plain YAML/JSON-able values."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def _check(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        arms = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(arms) < len(get_args(tp)):
            return None
        if len(arms) == 1:  # Optional[X]: report X's own, more precise error
            return _check(arms[0], value, key, source)
        for arm in arms:
            try:
                return _check(arm, value, key, source)
            except ParamsError:
                pass
        raise ParamsError(f"{source}: '{key}' must be {_type_name(tp)}, got {_describe(value)}")
    if tp is type(None):
        if value is None:
            return None
        raise ParamsError(f"{source}: '{key}' must be null, got {_describe(value)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed and type(value) is type(allowed[allowed.index(value)]):
            return value
        raise ParamsError(f"{source}: '{key}' must be one of {list(allowed)}, got {_describe(value)}")
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise ParamsError(f"{source}: '{key}' must be a list, got {_describe(value)}")
        (item,) = [a for a in get_args(tp) if a is not Ellipsis] or [Any]
        return tuple(_check(item, v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key, source)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        hint = (
            " (YAML reads 1e-4 as a string: write 1.0e-4)" if isinstance(value, str) and _looks_numeric(value) else ""
        )
        raise ParamsError(f"{source}: '{key}' must be a number, got {_describe(value)}{hint}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ParamsError(f"{source}: '{key}' must be an integer, got {_describe(value)}")
    if tp in (bool, str):
        if isinstance(value, tp):
            return value
        raise ParamsError(f"{source}: '{key}' must be {tp.__name__}, got {_describe(value)}")
    raise TypeError(f"unsupported params type {tp!r} for '{key}'")  # a schema bug, not a user error


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + str(list(get_args(tp)))
    if tp is type(None):
        return "null"
    if origin in (tuple, list):
        return "a list"
    return getattr(tp, "__name__", str(tp))
