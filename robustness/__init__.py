"""dsn-robustness: evaluate the adversarial robustness of dynamic (layer-skipping) networks.

The Python API (:mod:`robustness.app.api`)::

    from robustness import evaluate, load_run, compare, Results, __version__

The names are resolved on first use (PEP 562 ``__getattr__``): every ``import robustness.core.x`` runs this file,
spawned attack workers among them, so it must not import torch, pandas or the attack stack itself.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from robustness.app.api import Results, compare, evaluate, load_run

__all__ = ["evaluate", "load_run", "compare", "Results", "__version__"]

_API = ("evaluate", "load_run", "compare", "Results")


def __getattr__(name: str) -> Any:
    if name in _API:
        from robustness.app import api
        value = getattr(api, name)
    elif name == "__version__":
        from robustness.core.runtime import package_version
        value = package_version()
    else:
        raise AttributeError(f"module 'robustness' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
