"""The :class:`Check` type and the registry of checks that :func:`robustness.sanity.run_checks` runs.

A check registers itself with :func:`register_check`, which decorates a *runner*: a function of
:class:`CheckInputs` (the records and every option of ``run_checks``) that returns the check's :class:`Check`, or
None when it has nothing to say (``run_checks`` leaves it out). It is registered under the name of the
:class:`Check` it returns. Each check module of :mod:`robustness.sanity` registers its check when it is imported,
and the package imports them all, so the registry is complete once ``robustness.sanity`` is; a plug-in registers
its own check the same way (import it before running the checks), and :func:`unregister_check` removes it again.

``run_checks`` runs the checks in the order :func:`registered_checks` gives: by ``order``, ties in the order they
were registered. The built-in checks have the orders 10 to 100 (the table in the package docstring); a check
registered without an order (:data:`DEFAULT_ORDER`) comes after them. ``masking=True`` (the default) marks a
gradient-masking check: when non-finite rows dominate the records, ``run_checks`` replaces its result by a
``skip`` saying so (``finite-logits`` and the coarse-head note are registered with ``masking=False``).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import pandas as pd

Status = Literal["pass", "warn", "fail", "skip"]
#: statuses from worst to best (:func:`robustness.sanity.worst_status`)
SEVERITY: tuple[str, ...] = ("fail", "warn", "pass", "skip")
#: the order of a check registered without one: after every built-in check
DEFAULT_ORDER = 1000


@dataclass(frozen=True)
class Check:
    """Outcome of one check: ``status`` is ``pass``, ``warn``, ``fail`` or ``skip``; ``evidence`` is one sentence."""

    name: str
    status: Status
    evidence: str
    details: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form: name, status, evidence, details."""
        return {"name": self.name, "status": self.status, "evidence": self.evidence, "details": list(self.details)}


@dataclass(frozen=True, eq=False)
class CheckInputs:
    """What :func:`robustness.sanity.run_checks` hands every registered check: the records and its options."""

    df: pd.DataFrame
    zero_grad_share: float | pd.Series | Mapping[str, float] | None = None
    tol: float = 0.01
    margin: float = 0.03
    unbounded_threshold: float = 0.05
    alpha: float = 0.05
    min_samples: int = 3
    min_points: float = 0.02
    queries: Mapping[str, int] | None = None
    #: ``df``'s minimal distances (``analysis.distances.minimal_distances``) when the caller computed them already
    minimal: pd.DataFrame | None = None


#: a registered check's runner: its :class:`Check` for these inputs, or None when it has nothing to say
Runner = Callable[[CheckInputs], "Check | None"]


@dataclass(frozen=True)
class RegisteredCheck:
    """One entry of the registry: the check's ``name``, its runner ``run``, its ``order`` and whether it is a
    ``masking`` check (replaced by a skip when non-finite rows dominate the records)."""

    name: str
    run: Runner
    order: float
    masking: bool
    seq: int  # registration order, breaks ties of ``order``


_CHECKS: dict[str, RegisteredCheck] = {}
_SEQ = itertools.count()


def register_check(name: str, *, order: float = DEFAULT_ORDER, masking: bool = True) -> Callable[[Runner], Runner]:
    """Decorator: register a runner ``(CheckInputs) -> Check | None`` as check ``name`` (the name of the
    :class:`Check` it returns), run by :func:`robustness.sanity.run_checks` at ``order``; ``masking`` marks a
    gradient-masking check. A name registered twice is an error: :func:`unregister_check` it first."""
    def add(fn: Runner) -> Runner:
        if name in _CHECKS:
            raise ValueError(f"sanity check {name!r} is already registered (unregister_check it first)")
        _CHECKS[name] = RegisteredCheck(name, fn, order, masking, next(_SEQ))
        return fn
    return add


def unregister_check(name: str) -> None:
    """Remove check ``name`` from the registry (for plug-ins and tests); an unknown name is ignored."""
    _CHECKS.pop(name, None)


def registered_checks() -> tuple[RegisteredCheck, ...]:
    """The registered checks in the order :func:`robustness.sanity.run_checks` runs them."""
    return tuple(sorted(_CHECKS.values(), key=lambda c: (c.order, c.seq)))
