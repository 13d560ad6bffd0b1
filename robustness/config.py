"""Config files: TOML in ``configs/``, one table per part of the job, mapped onto typed dataclasses.

A config file has up to five tables: ``[data]`` and ``[model]`` and ``[train]`` (read by ``dsn-robust train``),
``[attack]`` (read by ``dsn-robust attack``) and ``[run]`` (read by ``dsn-robust run``). Command-line flags
override file values; the resolved values are written into the run directory.
"""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from robustness.errors import ConfigError

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
    """Instantiate dataclass ``cls`` from ``values``; unknown keys raise a ConfigError listing the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def overridden(base: T, **flags: Any) -> T:
    """``base`` with every flag that is not ``None`` replacing the field of the same name."""
    changes = {k: v for k, v in flags.items() if v is not None}
    return dataclasses.replace(base, **changes) if changes else base
