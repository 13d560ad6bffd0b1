"""The dataset registry: ``@register_dataset`` and the public entry points ``load_dataset``, ``dataset_info``,
``list_datasets``, ``dataset_options`` and ``dataset_needs_root``.

A leaf inside ``robustness.data``: it imports ``base`` only; each dataset module registers itself here. A dataset
is a loader ``load(split, [root,] **options)`` plus an info function ``info([root,] **options)`` that describes the
data while reading as little as the format allows. The loader's signature is the single source of truth:
- its keyword parameters after ``split`` (and ``root``) are the dataset's options; any other option is a
  ConfigError that lists the valid ones, raised before anything is read;
- a loader with a ``root`` parameter reads local files: the registry checks that a root was given and is a folder,
  and passes it as a ``Path`` to the loader and to the info function. Nothing is ever downloaded.
The info function receives the same options as the loader (it may ignore the ones that do not change the info).
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from robustness.core.errors import ConfigError, DataError, UnknownNameError
from robustness.data.base import SPLITS, CoarseFineDataset, DatasetInfo

log = logging.getLogger(__name__)

Loader = TypeVar("Loader", bound=Callable[..., CoarseFineDataset])


@dataclass(frozen=True)
class _Source:
    load: Callable[..., CoarseFineDataset]
    info: Callable[..., DatasetInfo]
    options: tuple[str, ...]
    needs_root: bool


_SOURCES: dict[str, _Source] = {}


def register_dataset(name: str, *, info: Callable[..., DatasetInfo]) -> Callable[[Loader], Loader]:
    """Decorator: register the decorated loader ``load(split, [root,] **options)`` as dataset ``name``, described by
    ``info([root,] **options)``. A name registered twice is a ConfigError (unregister it first)."""

    def decorate(load: Loader) -> Loader:
        if name in _SOURCES:
            raise ConfigError(f"dataset {name!r} is already registered")
        options, needs_root = _loader_signature(name, load)
        _SOURCES[name] = _Source(load, info, options, needs_root)
        return load

    return decorate


def unregister_dataset(name: str) -> None:
    """Forget dataset ``name`` (a plug-in's or a test's); an UnknownNameError if it is not registered."""
    if name not in _SOURCES:
        raise UnknownNameError("dataset", name, list_datasets())
    del _SOURCES[name]


def list_datasets() -> list[str]:
    """Names that ``load_dataset`` accepts."""
    return sorted(_SOURCES)


def dataset_needs_root(name: str) -> bool:
    """Whether dataset ``name`` reads a local copy (its loader takes a ``root``: ``--data-root``)."""
    return _source(name, {}).needs_root


def dataset_options(name: str) -> list[str]:
    """The options ``load_dataset(name, split, root, ...)`` accepts, in the loader's parameter order."""
    return list(_source(name, {}).options)


def load_dataset(name: str, split: str = "train", root: str | Path | None = None, **options: Any) -> CoarseFineDataset:
    """The ``split`` ("train" or "test") of dataset ``name``, read from ``root`` where the dataset lives on disk."""
    source = _source(name, options)
    if split not in SPLITS:
        raise ConfigError(f"{name}: unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if source.needs_root:
        dataset = source.load(split, _require_root(name, root), **options)
    else:
        dataset = source.load(split, **options)
    log.debug("loaded %r", dataset)
    return dataset


def dataset_info(name: str, root: str | Path | None = None, **options: Any) -> DatasetInfo:
    """The DatasetInfo of dataset ``name``, reading as little as the format allows."""
    source = _source(name, options)
    if source.needs_root:
        return source.info(_require_root(name, root), **options)
    return source.info(**options)


def _loader_signature(name: str, load: Callable[..., Any]) -> tuple[tuple[str, ...], bool]:
    """(option names, whether the loader takes a root) read from the loader's parameters."""
    params = list(inspect.signature(load).parameters.values())
    if not params or params[0].name != "split":
        raise ConfigError(f"dataset {name!r}: the loader's first parameter must be 'split'")
    needs_root = len(params) > 1 and params[1].name == "root"
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    rest = params[2 if needs_root else 1:]
    if any(p.kind not in keyword for p in rest):
        raise ConfigError(f"dataset {name!r}: the loader's options must be named keyword parameters")
    return tuple(p.name for p in rest), needs_root


def _source(name: str, options: dict[str, Any]) -> _Source:
    if name not in _SOURCES:
        raise UnknownNameError("dataset", name, list_datasets())
    source = _SOURCES[name]
    unknown = sorted(set(options) - set(source.options))
    if unknown:
        known = ", ".join(source.options) or "none"
        raise ConfigError(f"{name}: unknown option(s) {', '.join(unknown)}; known options: {known}")
    return source


def _require_root(name: str, root: str | Path | None) -> Path:
    if root is None or str(root) == "":
        raise DataError(f"{name}: no data root given; pass --data-root pointing at the local copy "
                        f"(nothing is downloaded)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{name}: data root {path} does not exist or is not a folder")
    return path
