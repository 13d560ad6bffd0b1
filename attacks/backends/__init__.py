"""The common shape of every attack, whichever library implements it, and the registry of (attack, backend).

An attack is a small class with a ``perturb(target, x, y, eps, seed)`` method that returns one adversarial batch per
budget in ``eps``. The runner does the rest identically for every backend: budget checks, the deterministic
re-evaluation that decides success, gate capture and records. Backends:

* ``torchattacks`` (:mod:`attacks.backends.torchattacks`): fgsm, pgd, cw, apgd-ce, apgd-dlr, square;
* ``foolbox`` (:mod:`attacks.backends.foolbox`): fgsm, pgd, cw;
* ``native`` (:mod:`attacks.adaptive`): the gate-aware attacks path and slowdown.

Shapes everywhere: images [B, C, H, W] in [0, 1]; labels [B] (int64, of the attacked head).
"""
from __future__ import annotations

import importlib
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch.nn import functional as F

from attacks.adapters import Evaluation, LogitsView, eval_logits, evaluate
from models.network import CoarseFineNet
from robustness.core.errors import UnknownNameError

NORMS = ("linf", "l2")
BACKENDS = ("torchattacks", "foolbox", "native")
_MODULES = ("attacks.backends.torchattacks", "attacks.backends.foolbox", "attacks.adaptive")
log = logging.getLogger(__name__)


@dataclass
class Target:
    """What is attacked: a model, the head whose labels are attacked, and how its gates behave for the attacker.

    ``gate_mode`` is the forward mode (the model is attacked *and* evaluated in it); ``gate_grad`` is the
    routing gradient the attacker differentiates through (only meaningful for a gated model in ``hard`` mode).
    """

    model: CoarseFineNet
    head: str = "fine"
    gate_mode: str = "hard"
    gate_grad: str = "none"
    eot_samples: int = 8
    device: torch.device | None = None

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = next(self.model.parameters()).device

    def view(self) -> LogitsView:
        """A fresh logits-only view (what the libraries call)."""
        return LogitsView(self.model, head=self.head, gate_mode=self.gate_mode, gate_grad=self.gate_grad,
                          eot_samples=self.eot_samples)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic no-grad logits of the attacked head (routing gradient ``none``)."""
        return eval_logits(self.model, x, self.head, self.gate_mode)

    def evaluate(self, x: torch.Tensor) -> Evaluation:
        return evaluate(self.model, x, self.gate_mode)


class Attack(ABC):
    """Base class: one attack of one backend.

    Class attributes: ``name`` (record name), ``backend``, ``norms`` it supports, ``minimal`` (a
    minimal-perturbation attack run once for all budgets, e.g. CW: a budget only admits an example whose norm is
    within it), ``gradient_free`` (the routing gradient does not matter), ``reference`` (paper).
    """

    name: ClassVar[str] = ""
    backend: ClassVar[str] = ""
    norms: ClassVar[tuple[str, ...]] = NORMS
    minimal: ClassVar[bool] = False
    gradient_free: ClassVar[bool] = False
    reference: ClassVar[str] = ""

    def __init__(self, norm: str = "linf", **params: Any):
        if norm not in self.norms:
            raise UnknownNameError(f"norm for attack {self.name!r}", norm, self.norms)
        self.norm = norm
        self.params = dict(params)

    @classmethod
    def from_config(cls, config: Any, norm: str) -> "Attack":
        """Build from an ``attacks.runner.AttackConfig`` (each attack reads the fields it needs)."""
        return cls(norm=norm)

    def config(self) -> dict[str, Any]:
        """The attack's parameters, for the manifest."""
        return {"norm": self.norm, **self.params}

    @abstractmethod
    def perturb(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float],
                seed: int) -> list[torch.Tensor]:
        """One adversarial batch per budget in ``eps`` (same order), each within its budget and in [0, 1]."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, dict[str, type[Attack]]] = {}


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator: make ``cls`` available as (``cls.name``, ``cls.backend``)."""
    _REGISTRY.setdefault(cls.name, {})[cls.backend] = cls
    return cls


_UNAVAILABLE: dict[str, str] = {}


def _load() -> None:
    """Import the backend modules (each registers its attacks); a library that fails to import is reported once."""
    for module in _MODULES:
        if module in _UNAVAILABLE:
            continue
        try:
            importlib.import_module(module)
        except ImportError as err:
            _UNAVAILABLE[module] = str(err)
            log.warning("attack backend %s is unavailable: %s", module.rsplit(".", 1)[-1], err)


def known_attacks() -> list[str]:
    """Every registered attack name."""
    _load()
    return sorted(_REGISTRY)


def backends_for(name: str) -> list[str]:
    """Backends that implement attack ``name`` (in :data:`BACKENDS` order)."""
    _load()
    if name not in _REGISTRY:
        raise UnknownNameError("attack", name, known_attacks())
    return [b for b in BACKENDS if b in _REGISTRY[name]]


def attack_class(name: str, backend: str) -> type[Attack]:
    """The class implementing ``name`` in ``backend``."""
    if backend not in backends_for(name):
        raise UnknownNameError(f"backend for attack {name!r}", backend, backends_for(name))
    return _REGISTRY[name][backend]


# --------------------------------------------------------------------------------------------------------------
# Helpers shared by the backends
# --------------------------------------------------------------------------------------------------------------


def flat_norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample ``linf`` or ``l2`` norm of ``delta`` [B, ...] -> [B] (float64)."""
    flat = delta.detach().flatten(1).double()
    if flat.shape[1] == 0:
        return flat.new_zeros(flat.shape[0])
    return flat.abs().amax(1) if norm == "linf" else flat.norm(p=2, dim=1)


def step_size(alpha: float | None, eps: float, steps: int) -> float:
    """PGD step: ``alpha`` when given, else ``2.5 * eps / steps`` (Madry et al. 2018)."""
    return float(alpha) if alpha is not None else 2.5 * float(eps) / max(int(steps), 1)


def select_worst(target: Target, candidates: Sequence[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Per sample, the first candidate that the deterministic forward misclassifies; else the highest-CE one."""
    best, best_wrong, best_loss = None, None, None
    for cand in candidates:
        logits = target.logits(cand)
        wrong = logits.argmax(1) != y
        loss = F.cross_entropy(logits.float(), y, reduction="none")
        if best is None:
            best, best_wrong, best_loss = cand.clone(), wrong, loss
            continue
        better = (wrong & ~best_wrong) | ((wrong == best_wrong) & ~best_wrong & (loss > best_loss))
        best[better] = cand[better]
        best_wrong = best_wrong | wrong
        best_loss = torch.where(better, loss, best_loss)
    return best


def keep_smallest_adversarial(target: Target, x: torch.Tensor, y: torch.Tensor,
                              candidates: Sequence[torch.Tensor], norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Among ``candidates`` keep per sample the smallest-norm one the deterministic forward misclassifies.

    Returns ``(best, found)``: ``best`` is the clean image where nothing was found. A library's success flag is
    never consulted: a candidate counts only if the recomputed prediction differs from ``y``.
    """
    best = x.clone()
    best_norm = torch.full((x.shape[0],), math.inf, dtype=torch.float64, device=x.device)
    found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for cand in candidates:
        wrong = target.logits(cand).argmax(1) != y
        norms = flat_norms(cand - x, norm)
        better = wrong & (norms < best_norm)
        best[better] = cand[better]
        best_norm = torch.where(better, norms, best_norm)
        found |= better
    return best, found


def within_budgets(x: torch.Tensor, best: torch.Tensor, found: torch.Tensor, eps: Sequence[float],
                   norm: str) -> list[torch.Tensor]:
    """For a minimal-perturbation attack: at each budget the found example if its norm fits, else the clean one."""
    norms = flat_norms(best - x, norm)
    out = []
    for e in eps:
        ok = (found & (norms <= float(e))).view(-1, *([1] * (x.dim() - 1)))
        out.append(torch.where(ok, best, x))
    return out


def ce_per_sample(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y, reduction="none")
