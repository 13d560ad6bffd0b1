"""The model registry: ``@register_model``, ``create_model(name, **options)``, ``list_models(pattern)``,
``unregister_model``.

A leaf, as timm's ``_registry.py`` is: it imports nothing of ``models`` and knows no model by name. Each model
module registers its entrypoints itself, and an entrypoint's keyword parameters *are* that model's options (read
with ``inspect.signature``): declare every option as a named keyword parameter with its default. ``models``'s
``__init__`` imports the built-in model modules, so ``import models.registry`` is enough to create them.
"""
from __future__ import annotations

import fnmatch
import inspect
import typing
from typing import Any, Callable, TypeVar

from torch import nn

from robustness.core.config import check_type
from robustness.core.errors import ConfigError, UnknownNameError, first_line

Entrypoint = TypeVar("Entrypoint", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_OPTION_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def register_model(fn: Entrypoint) -> Entrypoint:
    """Register a model entrypoint under its function name; its keyword parameters are the model's options."""
    _REGISTRY[fn.__name__] = fn
    return fn


def unregister_model(name: str) -> None:
    """Forget model ``name`` (a plug-in's or a test's); UnknownNameError if it is not registered."""
    if name not in _REGISTRY:
        raise UnknownNameError("model", name, list_models())
    del _REGISTRY[name]


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def _parameters(name: str) -> dict[str, inspect.Parameter]:
    if name not in _REGISTRY:
        raise UnknownNameError("model", name, list_models())
    signature = inspect.signature(_REGISTRY[name])
    return {p.name: p for p in signature.parameters.values() if p.kind in _OPTION_KINDS}


def _annotations(name: str) -> dict[str, Any]:
    """The entrypoint's parameter annotations, resolved (``from __future__ import annotations`` makes them strings);
    an annotation that does not resolve is left unchecked."""
    fn = _REGISTRY[name]
    try:
        return typing.get_type_hints(fn)
    except (NameError, TypeError):
        return {}


def _brief(options: dict[str, Any], limit: int = 120) -> str:
    """The options as ``k=v, ...`` without the long ones (mean, std), cut to ``limit`` characters."""
    text = ", ".join(f"{k}={v!r}" for k, v in options.items() if not isinstance(v, (list, tuple)))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def model_options(name: str) -> list[str]:
    """The options of model ``name`` (its entrypoint's keyword parameters), in declaration order."""
    return list(_parameters(name))


def all_model_options() -> list[str]:
    """Every option some registered model accepts, sorted (what a shared ``[model]`` table may hold)."""
    return sorted({option for name in _REGISTRY for option in _parameters(name)})


def check_options(name: str, options: dict[str, Any]) -> None:
    """ConfigError unless every option is one of model ``name``'s and has the type its entrypoint declares (the
    key, the value, the expected type): what a config can be checked for before data or a model exists."""
    params = _parameters(name)
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ConfigError(f"model {name!r} has no option(s) {', '.join(unknown)}; valid: {', '.join(params)}")
    hints = _annotations(name)
    for option, value in options.items():
        check_type(option, value, hints.get(option, Any), where=f"model {name!r}")


def own_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The entries of a shared ``[model]`` table that model ``name`` has (``gate_fn`` is dsn's, not resnet's)."""
    params = _parameters(name)
    return {k: v for k, v in options.items() if k in params}


def create_model(name: str, **options: Any) -> nn.Module:
    """Build model ``name``. Unknown names, unknown or missing options, a value of the wrong type (checked against
    the entrypoint's annotations: the key, the value, the expected type) and values the layers cannot use raise
    ConfigErrors.

    The model gets ``model_name`` and ``config`` (:func:`resolved_options`: what rebuilds the same model).
    """
    check_options(name, options)
    params = _parameters(name)
    missing = [p for p, param in params.items() if param.default is inspect.Parameter.empty and p not in options]
    if missing:
        raise ConfigError(f"model {name!r} needs option(s) {', '.join(missing)}")
    try:
        model = _REGISTRY[name](**options)
    except (TypeError, ValueError, RuntimeError, IndexError, ZeroDivisionError, OverflowError) as err:
        # Values of the right type that the layers cannot use (a channel count torch refuses, an image too small
        # for the strides): the entrypoint's own checks are the better message, this is the net below them.
        detail = first_line(err)
        raise ConfigError(f"model {name!r} cannot be built with options {_brief(options)}: {detail}") from None
    model.model_name = name
    model.config = resolved_options(name, options)
    return model


def resolved_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Every option of ``name`` with its value (given or default), JSON-safe: what rebuilds the same model."""
    params = _parameters(name)
    values = {p: options.get(p, param.default) for p, param in params.items()}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
