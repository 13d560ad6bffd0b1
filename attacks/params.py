"""Parameters of the attacks that several backends implement (fgsm, pgd, cw), and the checks every Params uses.

An attack's parameters are a frozen dataclass, ``Params``, declared on its class: field names are the attack's own
keyword arguments, field defaults its defaults. The attacks that one backend alone implements keep their Params
in their own file; fgsm and pgd are implemented by several backends, which share the one definition here (the
native PGD adds its losses).

Params are built through :func:`robustness.core.config.build` (by :class:`attacks.base.Attack`), which checks
names and types; the ``__post_init__`` checks below raise ``ValueError`` so that ``build`` turns them into one
ConfigError line naming the attack.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


def coerce_floats(params: Any) -> None:
    """Store every int given for a ``float`` field as a float (frozen dataclasses: via ``object.__setattr__``)."""
    for f in fields(params):
        value = getattr(params, f.name)
        if "float" in str(f.type) and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(params, f.name, float(value))


def require(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``."""
    if not ok:
        raise ValueError(message)


def positive_int(params: Any, *names: str) -> None:
    for name in names:
        value = getattr(params, name)
        require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"{name} must be a positive integer, got {value!r}")


def positive(params: Any, *names: str) -> None:
    for name in names:
        value = getattr(params, name)
        require(value is None or float(value) > 0, f"{name} must be positive, got {value!r}")


def non_negative(params: Any, *names: str) -> None:
    for name in names:
        value = getattr(params, name)
        require(float(value) >= 0, f"{name} must be >= 0, got {value!r}")


def step_size(alpha: float | None, eps: float, steps: int) -> float:
    """PGD step: ``alpha`` when given, else ``2.5 * eps / steps`` (Madry et al. 2018)."""
    return float(alpha) if alpha is not None else 2.5 * float(eps) / max(int(steps), 1)


@dataclass(frozen=True)
class NoParams:
    """An attack without parameters (FGSM)."""


FGSMParams = NoParams


@dataclass(frozen=True)
class PGDParams:
    """PGD: ``steps`` (50); ``alpha`` (absolute step size; ``None`` = ``2.5 * eps / steps``); ``random_start``
    (True); ``restarts`` (5: independent runs from random starts; per sample the first iterate of any run that
    fools the deployed forward is kept, see :mod:`attacks.tracking`). 50 steps x 5 restarts is the evaluation
    Madry et al. and RobustBench's PGD baselines use; size it down only knowing the attack gets weaker."""

    steps: int = 50
    alpha: float | None = None
    random_start: bool = True
    restarts: int = 5

    def __post_init__(self) -> None:
        coerce_floats(self)
        positive_int(self, "steps", "restarts")
        positive(self, "alpha")
