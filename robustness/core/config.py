"""Config files: TOML in ``configs/``, one table per part of the job, mapped onto typed dataclasses.

A config file has up to five tables: ``[data]`` and ``[model]`` and ``[train]`` (read by ``dsn-robust train``),
``[attack]`` (read by ``dsn-robust attack``) and ``[run]`` (read by ``dsn-robust run``). Command-line flags
override file values; the resolved values are written into the run directory.
"""
from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from robustness.core.errors import ConfigError

T = TypeVar("T")
SECTIONS = ("data", "model", "train", "attack", "run")


def load_config_file(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """Read a TOML config into ``{section: {key: value}}``; ``None`` gives an empty config."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown table(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: [{name}] must be a table")
    return raw


def build(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Instantiate dataclass ``cls`` from ``values``: the one validator every config goes through.

    Unknown keys raise a ConfigError listing the valid ones; every value is checked against its field's type
    annotation (:func:`check_type`) before the dataclass runs its own checks, so a wrong type is one clear line
    (the key, the value, the expected type) and never a TypeError deep inside.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table of options, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        check_type(name, value, hints.get(name, Any), where)
    try:
        return cls(**values)
    except (TypeError, ValueError, OverflowError) as err:
        raise ConfigError(f"{where}: {err}") from None


def check_type(name: str, value: Any, annotation: Any, where: str = "config") -> None:
    """Raise ConfigError unless ``value`` fits ``annotation`` (bool is never an int; an int is a float)."""
    if not _fits(value, annotation):
        raise ConfigError(f"{where}: {name} must be {_describe(annotation)}, got {value!r}")


def _fits(value: Any, annotation: Any) -> bool:
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, set, frozenset) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        inner = [a for a in args if a is not Ellipsis]
        return not inner or all(_fits(v, inner[0]) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True  # a type this checker does not know: the dataclass checks it


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if annotation is type(None):
        return "unset"
    if origin in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        if not inner:
            return "a list"
        members = typing.get_args(inner[0]) or (inner[0],)
        return "a list of " + " or ".join(getattr(m, "__name__", str(m)) for m in members) + " values"
    if origin is dict or annotation is dict:
        return "a table of options"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    name = getattr(annotation, "__name__", str(annotation))
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def overridden(base: T, **flags: Any) -> T:
    """``base`` with every flag that is not ``None`` replacing the field of the same name."""
    changes = {k: v for k, v in flags.items() if v is not None}
    return dataclasses.replace(base, **changes) if changes else base
