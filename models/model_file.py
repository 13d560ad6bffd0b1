"""A user's own architecture without editing the registry: ``--model-file my_nets.py:build`` or an entry point.

A *model source* says where a model's code lives, so that a checkpoint can rebuild it later:

* ``path/to/file.py:factory`` (``:build`` when the factory is left out): the function ``factory`` of that file;
* ``NAME``: the entry point ``NAME`` of the group :data:`ENTRY_POINT_GROUP` (``dsn_robustness.models``) that an
  installed package declares, e.g. in its pyproject.toml::

      [project.entry-points."dsn_robustness.models"]
      my_aig = "my_package.nets:build"

The factory returns an ``nn.Module``: a plain classifier on [0, 1] images, or a gated model of
:mod:`models.protocol`; :func:`models.protocol.adapt` makes it a suite model. The factory is called with the
options it declares (keyword parameters): the user's options must all be declared; the options derived from the
dataset (``num_classes``-like ones the caller offers in ``derived``) are passed only where declared.

Checkpoints of such a model record its source (:meth:`ModelSource.to_dict`, under ``model.source``) and rebuild
from it; when the file or the entry point has gone, loading fails with one line saying which.

Security: a model file is Python code the user chose to run, and it runs with the user's rights (as ``python
my_nets.py`` would). Only point ``--model-file`` at code you trust. Weights are data, not code: they still load
with ``torch.load(weights_only=True)``, so a weights file can never run anything.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from models.network import CoarseFineNet
from models.protocol import adapt
from models.safe_load import load_torch_file
from robustness.core.errors import CheckpointError, ConfigError, DSNError, first_line

#: The entry point group installed packages declare their model factories in.
ENTRY_POINT_GROUP = "dsn_robustness.models"
#: The factory of ``file.py`` when the spec names none.
DEFAULT_FACTORY = "build"

Factory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's code lives: ``kind`` ``file`` (``location`` = absolute path, ``factory`` = function name)
    or ``entry_point`` (``location`` = entry point name in :data:`ENTRY_POINT_GROUP`)."""

    kind: str
    location: str
    factory: str = ""

    def __str__(self) -> str:
        return f"{self.location}:{self.factory}" if self.kind == "file" else f"entry point {self.location!r}"

    @property
    def default_name(self) -> str:
        """The model name records carry when the user gives none: ``<file stem>:<factory>`` or the entry point."""
        return f"{Path(self.location).stem}:{self.factory}" if self.kind == "file" else self.location

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "location": self.location, "factory": self.factory}

    @classmethod
    def from_dict(cls, d: Any) -> ModelSource:
        if not isinstance(d, dict) or d.get("kind") not in ("file", "entry_point") or not d.get("location"):
            raise ConfigError(f"malformed model source {d!r}")
        return cls(str(d["kind"]), str(d["location"]), str(d.get("factory", "")))

    def load_factory(self) -> Factory:
        """The factory function; ConfigError (one line) when the file, the function or the entry point is missing."""
        return _file_factory(Path(self.location), self.factory) if self.kind == "file" else _entry_point(self.location)

    def build(self, options: dict[str, Any] | None = None, derived: dict[str, Any] | None = None, *,
              name: str | None = None, mean=None, std=None) -> CoarseFineNet:
        """The adapted model: ``factory(**options, **derived-it-declares)`` through :func:`models.protocol.adapt`,
        with ``source``, ``model_name`` and ``config`` (the options used) set so a checkpoint can rebuild it."""
        factory = self.load_factory()
        kwargs = _factory_kwargs(factory, str(self), dict(options or {}), dict(derived or {}))
        try:
            module = factory(**kwargs)
        except DSNError:
            raise
        except Exception as err:  # the user's code: report its failure as one line, never a traceback
            raise ConfigError(f"model factory {self} failed: {type(err).__name__}: {first_line(err)}") from None
        if not isinstance(module, nn.Module):
            raise ConfigError(f"model factory {self} returned {type(module).__name__}, not a torch.nn.Module")
        model = adapt(module, name=name or self.default_name, mean=mean, std=std)
        model.model_name = name or getattr(model, "model_name", "") or self.default_name
        model.config = kwargs
        model.source = self
        return model


def parse_model_spec(spec: str) -> ModelSource:
    """``file.py[:factory]`` -> a file source (path made absolute); anything else names an entry point."""
    spec = str(spec).strip()
    if not spec:
        raise ConfigError("empty --model-file; write e.g. my_nets.py:build")
    path, sep, factory = spec.rpartition(":") if ".py:" in spec else (spec, "", "")
    if path.endswith(".py") or "/" in path or "\\" in path:
        factory = factory if sep else DEFAULT_FACTORY
        if not factory.isidentifier():
            raise ConfigError(f"--model-file {spec!r}: {factory!r} is not a function name; write FILE.py:FUNCTION")
        return ModelSource("file", str(Path(path).expanduser().resolve()), factory)
    return ModelSource("entry_point", spec)


def load_model_file(spec: str) -> Factory:
    """The factory that ``spec`` (``my_nets.py:build`` or an entry point name) names: what ``--model-file`` loads."""
    return parse_model_spec(spec).load_factory()


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (a plain ``torch.save(model.state_dict())`` or a dict holding ``state_dict``),
    read with ``weights_only=True``; CheckpointError (one line) for a missing, corrupt or unsafe file."""
    raw = load_torch_file(path, "weights file")
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path}: not a state dict (a dict of tensors, as torch.save(model.state_dict()) "
                              f"writes)")
    return raw


def build_from_spec(spec: str, weights: str | Path | None = None, options: dict[str, Any] | None = None,
                    derived: dict[str, Any] | None = None, *, name: str | None = None, mean=None,
                    std=None) -> CoarseFineNet:
    """The model ``spec`` names, built with ``options`` and given ``weights`` (the *wrapped module's* state dict),
    adapted, in eval mode: what ``dsn-robust attack --model-file SPEC --weights W`` attacks."""
    source = parse_model_spec(spec)
    model = source.build(options, derived, name=name, mean=mean, std=std)
    if weights is not None:
        target = getattr(model, "net", model)  # adapt's wrappers hold the user's module as ``net``
        try:
            target.load_state_dict(load_weights(weights))
        except (RuntimeError, TypeError) as err:
            raise CheckpointError(f"{weights}: weights do not fit model {source}: {first_line(err)}") from None
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------


def _file_factory(path: Path, factory: str) -> Factory:
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    # one module per file path (and contents), so two files called nets.py do not shadow each other
    digest = hashlib.sha256(str(path).encode() + path.read_bytes()).hexdigest()[:12]
    module_name = f"dsn_robustness_model_file_{path.stem}_{digest}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"model file {path} cannot be imported (is it a .py file?)")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look their module up here
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # the user's code: one line, never a traceback
            del sys.modules[module_name]
            raise ConfigError(f"model file {path} failed to import: {type(err).__name__}: {first_line(err)}") \
                from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module_name)
        raise ConfigError(f"model file {path} has no function {factory!r}; it defines: {', '.join(found) or 'none'}")
    return fn


def _entry_point(name: str) -> Factory:
    found = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        known = sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        raise ConfigError(f"no model file or entry point {name!r} (group {ENTRY_POINT_GROUP}; installed: "
                          f"{', '.join(known) or 'none'}); for a file write FILE.py:FUNCTION")
    try:
        return found[0].load()
    except Exception as err:  # an installed package's import failure: one line
        raise ConfigError(f"entry point {name!r} ({found[0].value}) failed to load: {type(err).__name__}: "
                          f"{first_line(err)}") from None


def _factory_kwargs(factory: Factory, where: str, options: dict[str, Any], derived: dict[str, Any]) -> dict:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {**derived, **options}
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                         inspect.Parameter.KEYWORD_ONLY)}
    unknown = sorted(set(options) - named) if not open_kwargs else []
    if unknown:
        raise ConfigError(f"model factory {where} has no option(s) {', '.join(unknown)}; it takes: "
                          f"{', '.join(sorted(named)) or 'none'}")
    kwargs = {k: v for k, v in derived.items() if open_kwargs or k in named}
    kwargs.update(options)
    return kwargs
