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

A model file may import modules beside it (``from skipnet_models import SkipNet``, as public SkipNet and ConvNet-AIG
code is laid out): while the file is imported and while its factory runs, its folder is first on ``sys.path``
(:func:`_importable`), and only then, so the folder's other files cannot shadow what the suite imports later. The
sibling modules stay in ``sys.modules`` for the forwards that follow. Pitfalls: a sibling first imported *inside* a
forward is not found (import it at the top of the file); siblings are cached by name for the process, so two model
files beside two different ``common.py`` share the first one loaded; and a sibling named like a suite package
(SkipNet's ``models.py``) loses to that package, already imported: the import error says to rename it.

An exception raised in the user's own code is told from a bug of the suite by the innermost frame of its traceback
that lies in a loaded model file's folder (:func:`user_code_frame`), minus installed code below that folder (a
virtual environment, the suite itself when the file sits in the project's root); it is named by that FILE:LINE
(:func:`describe_user_error`, and the CLI's ``your model raised ...``, exit 2).

Security: a model file is Python code the user chose to run, and it runs with the user's rights (as ``python
my_nets.py`` would). Only point ``--model-file`` at code you trust. Weights are data, not code: they still load
with ``torch.load(weights_only=True)``, so a weights file can never run anything.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

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

#: The folders of the model files loaded in this process: code there (the file and its sibling modules) is the
#: user's, so its exceptions are the user's to fix (:func:`user_code_frame`).
_USER_FOLDERS: set[Path] = set()
#: The suite's own packages: their code is never the user's, even when a model file sits in the project's root.
SUITE_PACKAGES = ("robustness", "models", "attacks", "reports")


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
            raise ConfigError(f"model factory {self} failed: {describe_user_error(err)}") from None
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


def user_code_frame(err: BaseException) -> tuple[str, int] | None:
    """Where ``err`` was raised in the user's code: ``(file, line)`` of the innermost frame of its traceback that
    lies in the folder of a loaded model file (the file or a sibling module), or None when no frame does (then
    the error is the suite's, or a library's it called on its own). A SyntaxError in the user's code is placed at
    its own file and line, which no frame holds."""
    if isinstance(err, SyntaxError) and err.filename and _is_user_file(err.filename):
        return str(err.filename), int(err.lineno or 0)
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        if _is_user_file(frame.filename):
            return frame.filename, int(frame.lineno or 0)
    return None


def describe_user_error(err: BaseException) -> str:
    """``IndexError: <first line> at FILE:LINE``: an exception of the user's code as one clause, placed where the
    user can fix it (the place is left out when no frame of theirs holds it), with a hint for an import that found
    the suite's package instead of the user's module of that name."""
    where = user_code_frame(err)
    at = f" at {where[0]}:{where[1]}" if where else ""
    top = (getattr(err, "name", None) or "").partition(".")[0] if isinstance(err, ImportError) else ""
    if top in SUITE_PACKAGES and any((folder / f"{top}.py").is_file() for folder in _USER_FOLDERS):
        at += f" (the suite's package {top} shadows your {top}.py: rename that module)"
    return f"{type(err).__name__}: {first_line(err)}{at}"


def _is_user_file(filename: str) -> bool:
    """Whether ``filename`` lies in a loaded model file's folder and is not installed code below it: the suite's
    packages (a model file in the project's root) and anything under a ``sys.path`` entry inside that folder (a
    virtual environment, ``~/.local`` site-packages or a Python of a model file in the home folder)."""
    if not filename or filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return False
    path = Path(filename).resolve()
    folders = [f for f in _USER_FOLDERS if path.is_relative_to(f)]
    if not folders:
        return False
    installed = [Path(p).resolve() for name in SUITE_PACKAGES for p in getattr(sys.modules.get(name), "__path__", [])]
    entries = (Path(entry).resolve() for entry in sys.path if entry)
    installed += [e for e in entries if e not in _USER_FOLDERS and any(e.is_relative_to(f) for f in folders)]
    return not any(path.is_relative_to(folder) for folder in installed)


@contextmanager
def _importable(folder: Path) -> Iterator[None]:
    """``folder`` first on ``sys.path`` for the duration (only that entry is taken out afterwards, even on error).
    Import caches are dropped first: a sibling written a moment ago (as a test or a notebook does) would otherwise
    be missed when the folder was on ``sys.path`` before."""
    entry = str(folder)
    importlib.invalidate_caches()
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)  # the first one: ours, unless the user's code put the same folder before it


def _in_folder(fn: Factory, folder: Path) -> Factory:
    """``fn`` run with ``folder`` importable (:func:`_importable`), wherever it is called: ``build``, a checkpoint
    rebuilding the model, or a caller of :func:`load_model_file`. Its signature stays ``fn``'s (``__wrapped__``),
    which :func:`_factory_kwargs` reads."""
    @functools.wraps(fn)
    def factory(*args: Any, **kwargs: Any) -> nn.Module:
        with _importable(folder):
            return fn(*args, **kwargs)
    return factory


def _file_factory(path: Path, factory: str) -> Factory:
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist")
    path = path.resolve()
    _USER_FOLDERS.add(path.parent)  # before the import: its failure is the user's too
    # one module per file path (and contents), so two files called nets.py do not shadow each other
    digest = hashlib.sha256(str(path).encode() + path.read_bytes()).hexdigest()[:12]
    module_name = f"dsn_robustness_model_file_{path.stem}_{digest}"
    module = sys.modules.get(module_name) or _import_file(path, module_name)
    fn = getattr(module, factory, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module_name)
        raise ConfigError(f"model file {path} has no function {factory!r}; it defines: {', '.join(found) or 'none'}")
    return _in_folder(fn, path.parent)


def _import_file(path: Path, module_name: str) -> Any:
    """The module of model file ``path``, imported with its folder importable; ConfigError (one line naming the
    user's FILE:LINE) when its code fails."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"model file {path} cannot be imported (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up here
    try:
        with _importable(path.parent):
            spec.loader.exec_module(module)
    except Exception as err:  # the user's code: one line, never a traceback
        del sys.modules[module_name]
        raise ConfigError(f"model file {path} failed to import: {describe_user_error(err)}") from None
    return module


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
