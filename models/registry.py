"""timm-style model registry: ``@register_model``, ``create_model(name, **cfg)``, ``list_models(pattern)``."""
from __future__ import annotations

import fnmatch
import inspect
from typing import Callable

from models.baselines import ResNet
from models.dsn import DSN
from models.gates import GATE_FUNCTIONS
from models.network import CoarseFineNet
from robustness.core.errors import ConfigError, UnknownNameError

_REGISTRY: dict[str, Callable[..., CoarseFineNet]] = {}


def register_model(fn: Callable[..., CoarseFineNet]) -> Callable[..., CoarseFineNet]:
    """Register a model constructor under its function name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_options(name: str) -> list[str]:
    """The keyword options ``create_model(name, ...)`` accepts."""
    if name not in _REGISTRY:
        raise UnknownNameError("model", name, list_models())
    # One option set for every built-in model, so that one config trains dsn, dual and resnet alike; options a
    # model has no use for (gate_fn for resnet) are ignored by it.
    target = DSN if name in ("dsn", "dual", "resnet") else _REGISTRY[name]
    return [p for p in inspect.signature(target).parameters if p not in ("self", "ignored", "gated")]


def create_model(name: str, **cfg) -> CoarseFineNet:
    """Build a registered model. Unknown names and options raise errors that list the valid ones."""
    if name not in _REGISTRY:
        raise UnknownNameError("model", name, list_models())
    unknown = sorted(set(cfg) - set(model_options(name)))
    if unknown:
        raise ConfigError(f"model {name!r} has no option(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(model_options(name))}")
    if cfg.get("depth_n", 3) < 1 or cfg.get("width", 16) < 1:
        raise ConfigError("depth_n and width must be >= 1")
    model = _REGISTRY[name](**cfg)
    model.model_name = name
    model.config = resolved_options(name, cfg)
    return model


def resolved_options(name: str, cfg: dict) -> dict:
    """Every option of ``name`` with its value (given or default), JSON-safe: what rebuilds the same model."""
    target = DSN if name in ("dsn", "dual", "resnet") else _REGISTRY[name]
    params = inspect.signature(target).parameters
    options = {p: cfg.get(p, params[p].default) for p in model_options(name)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


@register_model
def dsn(**cfg) -> CoarseFineNet:
    """DSN: trunk + gated coarse and fine branches, feedback, FiLM on the path (our reconstruction)."""
    gate_fn = cfg.get("gate_fn", "hardsig")
    if gate_fn not in GATE_FUNCTIONS:
        raise UnknownNameError("gate function", gate_fn, GATE_FUNCTIONS)
    if cfg.get("depth_n", 3) < 2:
        raise ConfigError("dsn needs depth_n >= 2: a stage's first block is never gated")
    return DSN(gated=True, **cfg)


@register_model
def dual(**cfg) -> CoarseFineNet:
    """DSN's topology (trunk, coarse and fine branches, feedback) without gates or FiLM: the static twin."""
    cfg.pop("gate_fn", None)
    cfg.pop("film", None)
    return DSN(gated=False, film=False, **cfg)


@register_model
def resnet(**cfg) -> CoarseFineNet:
    """Single-branch CIFAR ResNet-(6n+2) with fine and coarse heads."""
    return ResNet(**cfg)
