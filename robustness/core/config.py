"""Config files: TOML in ``configs/``, one table per part of the job, mapped onto typed dataclasses.

A config file has up to five tables: ``[data]`` and ``[model]`` and ``[train]`` (read by ``dsn-robust train``),
``[attack]`` (read by ``dsn-robust attack``) and ``[run]`` (read by ``dsn-robust run``). Command-line flags
override file values; the resolved values are written into the run directory.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import logging
import math
import numbers
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from robustness.core.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Ranges of integer options, checked before any work starts (a value outside them is one ConfigError line naming
#: the option, never an OverflowError deep inside numpy or torch): seeds are int64 values (what numpy, torch and the
#: records store); counts (samples, batch sizes, steps, restarts, queries, ...) fit an int32, as the libraries'
#: loops and index arithmetic expect; epochs, processes and threads have bounds no real job reaches.
MAX_SEED = 2 ** 63 - 1
MAX_COUNT = 2 ** 31 - 1
MAX_EPOCHS = 100_000
MAX_WORKERS = 256
MAX_THREADS = 1024
SECTIONS = ("data", "model", "train", "attack", "run")
#: The ``[data]`` keys that are no dataset's option and mean the same for every dataset (``TrainConfig.from_tables``
#: reads them): every other ``[data]`` key is an option of the named dataset's loader (``robustness.data.registry``),
#: and options that share a name do not share a meaning (digits' ``seed`` draws the split, synthetic's generates the
#: images; digits' ``image_size`` defaults to 16, synthetic's to 32).
DATA_TABLE_KEYS = ("name", "root", "train_limit", "test_limit")
#: The config ``dsn-robust run`` reads without ``--config``; its ``[attack]`` table is also ``dsn-robust attack``'s
#: and the Python API's default evaluation (:func:`attacks.runner.config.default_attack_table`).
DEFAULT_CONFIG = "configs/quickstart.toml"


def default_config_path() -> Path:
    """:data:`DEFAULT_CONFIG` of the working directory, else the one of this source checkout (which may not exist
    for an installed package: callers check)."""
    if Path(DEFAULT_CONFIG).is_file():
        return Path(DEFAULT_CONFIG)
    beside_source = Path(__file__).resolve().parents[2] / DEFAULT_CONFIG
    return beside_source if beside_source.is_file() else Path(DEFAULT_CONFIG)


def load_config_file(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """Read a TOML config into ``{section: {key: value}}``; ``None`` gives an empty config."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    except OSError as err:  # permission denied, a file that vanished, an I/O error
        raise ConfigError(f"cannot read config file {path}: {(err.strerror or str(err)).lower()}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown table(s) {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    for name, table in raw.items():
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: [{name}] must be a table")
    return raw


def parse_dotted(text: str, grammar: str = "TABLE.KEY", example: str = "attack.n=256", hint: str = "") -> \
        tuple[tuple[str, ...], Any]:
    """The one grammar of ``--set``: ``"a.b.c=VALUE"`` -> ``(("a", "b", "c"), value)``, at least two dotted
    parts, each stripped and non-empty, and the value read as TOML (:func:`toml_value`). Anything else is a
    ConfigError ``--set TEXT: write GRAMMAR=VALUE, e.g. EXAMPLE`` (+ ``hint``); what the parts may name is the
    caller's to check (``run``: a config table, :func:`parse_override`; ``attack``: an attack name)."""
    key, sep, raw = str(text).partition("=")
    parts = tuple(p.strip() for p in key.split("."))
    if not sep or len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: write {grammar}=VALUE, e.g. {example}{hint}")
    return parts, toml_value(raw)


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """``"attack.n=256"`` -> ``(("attack", "n"), 256)``: a dotted key that starts with a config table (further dots
    reach sub-tables: ``attack.pgd.restarts=5``) and a value read as TOML (a bare word that is not TOML, such as
    ``cuda`` or ``8/255``, is a string)."""
    parts, value = parse_dotted(text, hint=f" (tables: {', '.join(SECTIONS)})")
    if parts[0] not in SECTIONS:
        raise ConfigError(f"--set {text!r}: unknown table {parts[0]!r}; choose one of: {', '.join(SECTIONS)}")
    return parts, value


def toml_value(raw: str) -> Any:
    """A command-line value read as a TOML value (``5``, ``true``, ``["ce"]``); a bare word that is not TOML, such
    as ``cuda`` or ``8/255``, is the string itself."""
    try:
        return tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        return raw.strip()


def apply_overrides(tables: dict[str, dict[str, Any]], settings: list[str] | tuple[str, ...],
                    unset: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A copy of the config ``tables`` with each ``TABLE.KEY`` of ``unset`` removed, then each ``--set
    TABLE.KEY=VALUE`` of ``settings`` applied in order.

    Keys are not checked here: the tables go through :func:`build` (or the model registry) like a file's, so an
    unknown key is the same one line listing the valid ones. A ``--set data.name=OTHER`` that switches the
    dataset the ``[data]`` table names drops that table's options of the old dataset (:func:`switch_dataset`).
    """
    merged: dict[str, Any] = {name: dict(table) for name, table in tables.items()}
    for text in unset:
        _unset(merged, text)
    given: list[tuple[str, ...]] = []
    for text in settings:
        parts, value = parse_override(text)
        given.append(parts)
        table = merged.setdefault(parts[0], {})
        for part in parts[1:-1]:
            inner = table.get(part)
            if inner is not None and not isinstance(inner, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(parts[:-1])} is a value, not a table")
            table[part] = table = dict(inner or {})
        table[parts[-1]] = value
    return switch_dataset(tables, merged, given)


def switch_dataset(original: dict[str, Any], merged: dict[str, Any], given: list[tuple[str, ...]]) -> dict[str, Any]:
    """``merged`` (``original`` with the ``--set`` keys ``given`` applied) without the old dataset's options when
    ``data.name`` now names another dataset than ``original``'s ``[data]`` table does.

    Kept: :data:`DATA_TABLE_KEYS` (``root``, ``train_limit``, ``test_limit``) and every ``data.*`` key set on the
    command line, whatever its place among the ``--set``s; the dropped keys are logged in one line. A ``[data]``
    table without a name (the default dataset's), before or after, is left as it is: an option the new dataset
    lacks is the registry's one line naming the valid ones.
    """
    old = original.get("data", {}).get("name")
    data = merged.get("data", {})
    new = data.get("name")
    if old is None or new is None or new == old:
        return merged
    chosen = {parts[1] for parts in given if parts[0] == "data"}
    dropped = sorted(k for k in data if k not in DATA_TABLE_KEYS and k not in chosen)
    if dropped:
        merged = {**merged, "data": {k: v for k, v in data.items() if k not in dropped}}
        log.info("--set data.name=%s: dropped the [data] option(s) of %s: %s (set %s's own with --set "
                 "data.KEY=VALUE)", new, old, ", ".join(dropped), new)
    return merged


def _unset(tables: dict[str, Any], text: str) -> None:
    """Remove ``TABLE.KEY`` (further dots reach sub-tables) from ``tables`` in place, copying the tables it
    changes; a key the config does not hold is a ConfigError naming the keys it does hold."""
    parts = tuple(p.strip() for p in str(text).split("."))
    if len(parts) < 2 or not all(parts) or "=" in str(text):
        raise ConfigError(f"--unset {text!r}: write TABLE.KEY, e.g. data.image_size (tables: {', '.join(SECTIONS)})")
    if parts[0] not in SECTIONS:
        raise ConfigError(f"--unset {text!r}: unknown table {parts[0]!r}; choose one of: {', '.join(SECTIONS)}")
    table = tables
    for depth, part in enumerate(parts):
        inner = table.get(part)
        if inner is None:
            held = ", ".join(sorted(table)) if table else "none"
            raise ConfigError(f"--unset {text!r}: the config sets no {'.'.join(parts[:depth + 1])} "
                              f"(keys there: {held})")
        if depth == len(parts) - 1:
            del table[part]
        elif not isinstance(inner, dict):
            raise ConfigError(f"--unset {text!r}: {'.'.join(parts[:depth + 1])} is a value, not a table")
        else:
            table[part] = table = dict(inner)


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
    values = {name: as_declared(value, hints.get(name, Any)) for name, value in values.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError, OverflowError) as err:
        raise ConfigError(f"{where}: {err}") from None


def check_int(name: str, value: Any, low: int, high: int, where: str = "") -> int:
    """``value`` as an int in ``low..high``; a ConfigError naming ``name`` (prefixed by ``where``) otherwise. bool is
    never an int; numpy integers are accepted."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{prefix}{name} must be an integer in {low}..{high}, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise ConfigError(f"{prefix}{name} must be in {low}..{high}, got {brief_number(value)}")
    return value


def as_declared(value: Any, annotation: Any) -> Any:
    """``value`` as its field declares it: an int given for a float field (``lr = 1``) becomes that float, so the
    config, its records and every later check hold a float (an int such as 2**63 would otherwise pass as an
    "int64 overflow" into numpy); an int too large for any float is left for the finiteness check to refuse."""
    if isinstance(value, bool) or not isinstance(value, int) or not is_finite(value):
        return value
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    return float(value) if float in members and int not in members else value


def is_finite(value: Any) -> bool:
    """Whether the number ``value`` is finite (an int too large for a float is not: it cannot be used as one)."""
    try:
        return math.isfinite(value)
    except (OverflowError, TypeError, ValueError):
        return False


def check_finite(name: str, value: Any, where: str = "") -> None:
    """ConfigError naming ``name`` unless the number ``value`` (None passes) is finite."""
    if value is not None and not isinstance(value, bool) and isinstance(value, (int, float)) and not is_finite(value):
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}{name} must be a finite number, got {brief_number(value)}")


def brief_number(value: Any) -> str:
    """A number as written, or an int of 25 digits and more as a power of two (a 400-digit number in a message
    would be one line, but not one to read)."""
    if isinstance(value, int) and abs(value) >= 10 ** 24:
        sign = "-" if value < 0 else ""
        bits = abs(value).bit_length() - 1
        return f"{sign}2**{bits}" if abs(value) == 1 << bits else f"{sign}about 2**{bits}"
    return repr(value)


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
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence) or annotation in (list, tuple):
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
    if origin in (list, tuple, collections.abc.Sequence):
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
