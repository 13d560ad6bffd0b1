"""Which evaluations a config asks for: one :class:`EvalPlan` per (attack, backend, gate mode, routing gradient).

An evaluation is one (attack, backend, norm, gate_mode, gate_grad, target, source_run) with its list of eps. Its id
(a directory name) is ``<attack>__<backend>__<norm>__<gate_mode>__<gate_grad>__<target>``, plus
``__from-<source run>`` for transfer, e.g. ``pgd__torchattacks__linf__hard__bpda__fine``.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from attacks.base import GRADIENT_FREE, MINIMAL, Attack, attack_class, backends_for, known_attacks
from attacks.runner.cascade import link
from attacks.runner.config import AttackConfig, dedupe
from robustness.core.errors import ConfigError
from robustness.core.norms import L2_NORM
from robustness.core.runtime import jsonable

log = logging.getLogger(__name__)

#: The norm of ``cw_eps``: the L2 budgets a minimal-norm attack outside the run's norm is scored at.
CW_EPS_NORM = L2_NORM.name


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "_"


@dataclass
class EvalPlan:
    """One evaluation: an attack object plus where and how it is run and scored."""

    attack: Attack
    eps: list[float]
    gate_mode: str
    gate_grad: str
    target: str
    source_run: str = ""
    #: the ids of the evaluations this one follows (its cascade predecessors; a refining attack's evidence):
    #: :func:`attacks.runner.cascade.link`
    after: tuple[str, ...] = ()
    #: appended to the id: ``__eps-<digest>`` for budgets added to a finished evaluation (attacks.runner.growth)
    suffix: str = ""

    @property
    def name(self) -> str:
        return self.attack.name

    @property
    def backend(self) -> str:
        return self.attack.backend

    @property
    def norm(self) -> str:
        return self.attack.norm

    @property
    def id(self) -> str:
        base = "__".join([self.name, self.backend, self.norm, self.gate_mode, self.gate_grad, self.target])
        return base + (f"__from-{_safe(self.source_run)}" if self.source_run else "") + self.suffix

    def describe(self, complete: bool = False) -> dict[str, Any]:
        """The manifest entry of this evaluation."""
        return {"id": self.id, "attack": self.name, "kind": self.attack.kind, "backend": self.backend,
                "norm": self.norm,
                "eps": list(self.eps), "gate_mode": self.gate_mode, "gate_grad": self.gate_grad,
                "target": self.target, "source_run": self.source_run, "config": jsonable(self.attack.config()),
                # a refining attack's evidence is recorded, not fingerprinted: its examples stay valid (verified,
                # below the bounds it had) when evaluations are added later
                **({"evidence": list(self.after)} if self.attack.refines else {"after": list(self.after)}),
                "complete": bool(complete)}


def _attacks_to_run(config: AttackConfig) -> list[tuple[str, str, str, list[float]]]:
    """``(attack, backend, norm, eps)`` for every attack the config asks for, in order.

    A minimal-norm attack runs in each of its norms that is ``config.norm`` or one of ``config.distance_norms``
    (else in its first), unbounded: its rows at eps = inf hold each sample's minimal norm (and whether one was
    found); the robustness curve gives every budget from them (``robustness.analysis.distances``), independently of
    the fixed-budget attacks. Only an L2 one under ``--norm linf`` is also scored at the L2 budgets ``cw_eps``,
    where it is the main L2 number. With
    ``minimal_check``, PGD also runs at the L2 budgets of an L2 minimal attack under ``--norm linf``: the
    minimal attack's convergence check, and a fixed-budget floor under the L2 numbers. With ``eps = auto`` only the
    minimal attacks are returned: the fixed-budget ones wait for the grid.
    """
    out: list[tuple[str, str, str, list[float]]] = []
    for name in config.expanded_attacks():
        chosen = config.backends_of(name)
        if not chosen:
            log.info("skipping %s: it exists only in %s (asked for %s)", name, ", ".join(backends_for(name)),
                     ", ".join(config.backends))
            continue
        for backend in chosen:
            cls = attack_class(name, backend)
            if cls.refines and config.eps_auto:
                continue  # it starts from every other attack's finds: it runs with the fixed-budget ones
            if cls.kind != MINIMAL:
                if not config.eps_auto:
                    norm = config.norm if config.norm in cls.norms else cls.norms[0]
                    eps = config.fixed_eps() if norm == config.norm else list(config.cw_eps)
                    out.append((name, backend, norm, eps))
                continue
            norms = [v for v in cls.norms if v == config.norm or v in config.distance_norms] or [cls.norms[0]]
            for norm in norms:
                eps = list(config.cw_eps) if norm == CW_EPS_NORM and norm != config.norm else []
                out.append((name, backend, norm, dedupe([*eps, math.inf])))
                check = config.backends_of("pgd") if config.minimal_check and "pgd" in known_attacks() else []
                if norm != config.norm and norm == CW_EPS_NORM and check and config.cw_eps:
                    out.append(("pgd", check[0], norm, list(config.cw_eps)))
    return _unique(out)


def _unique(items: list[tuple[str, str, str, list[float]]]) -> list[tuple[str, str, str, list[float]]]:
    seen: set[tuple[str, str, str]] = set()
    kept = []
    for name, backend, norm, eps in items:
        if (name, backend, norm) not in seen:
            seen.add((name, backend, norm))
            kept.append((name, backend, norm, eps))
    return kept


def plan_evaluations(config: AttackConfig, gated: bool, source_run: str = "") -> list[EvalPlan]:
    """The evaluations ``config`` asks for on a model that is ``gated`` (or not), with skips logged.

    Routing gradients collapse to ``none`` where they cannot matter: a model without gates, a gate mode without
    routing, a gradient-free attack.
    """
    plans: list[EvalPlan] = []
    collapsed: set[str] = set()
    for name, backend, norm, eps in _attacks_to_run(config):
        cls = attack_class(name, backend)
        attack = cls(norm, **config.options_for(name, backend))
        for mode in config.gate_modes:
            grads = config.gate_grads
            if not gated or mode != "hard" or cls.kind == GRADIENT_FREE:
                if grads != ["none"]:
                    why = ("the model the examples are crafted on has no gates" if not gated else
                           f"gate mode {mode!r} has no routing" if mode != "hard" else f"{name} is gradient-free")
                    if why not in collapsed:
                        log.info("routing gradients collapse to 'none': %s", why)
                        collapsed.add(why)
                grads = ["none"]
            for grad in grads:
                plans.append(EvalPlan(attack, list(eps), mode, grad, config.target, source_run))
    if not plans:
        raise ConfigError("nothing to run: no requested attack exists in the requested backend(s) "
                          f"{', '.join(config.backends)}")
    return link(plans, config.cascade)
