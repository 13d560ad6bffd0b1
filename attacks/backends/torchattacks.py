"""torchattacks 3.5.1 behind the common :class:`attacks.base.Attack` interface.

Facts this file works around (DESIGN.md, "Library facts that bite"):

* torchattacks calls ``model(x)`` and needs one logits tensor: it gets a :class:`attacks.adapters.LogitsView`.
* Normalisation lives inside our models, so ``set_normalization_used`` is never called.
* Its CW has no search over ``c`` (a fixed c is far from minimal: 48% "robust" at L2 0.25 where an L2 PGD finds
  17% on the quickstart dsn) and takes ``max((1 - onehot) * logits)`` as the best other logit (0 whenever every
  other logit is negative, as EOT log-probabilities are): it is not offered. CW is foolbox's, with its binary
  search.
* ``PGD`` keeps its *last* iterate and has no restarts: we run it ``restarts`` times and every iterate it
  evaluates reaches the attack's :class:`attacks.tracking.BestAdversarial` through the model view.
* ``APGD`` and ``AutoAttack`` attack subsets of the batch after their first pass; those calls are not offered
  (they keep their own best fooling point, decided by the view's forward, which for ``none`` is the deployed one).
* The device is passed explicitly (``set_device``); nothing assumes CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torchattacks as ta

from attacks.base import GRADIENT_FREE, ITERATIVE, SINGLE_STEP, Attack, Target, register
from attacks.params import FGSMParams, PGDParams, coerce_floats, positive, positive_int, require, step_size

#: The library's name and PGD class of each norm.
_TA_NORM = {"linf": "Linf", "l2": "L2"}
_TA_PGD = {"linf": ta.PGD, "l2": ta.PGDL2}
#: The library's single step per norm: FGSM in ``linf``; in ``l2`` (the fast gradient method) ``PGDL2``'s single
#: step of size eps without a random start.
_TA_FGSM = {"linf": lambda view, eps: ta.FGSM(view, eps=eps),
            "l2": lambda view, eps: ta.PGDL2(view, eps=eps, alpha=eps, steps=1, random_start=False)}


def _prepared(attack: ta.Attack, target: Target) -> ta.Attack:
    attack.set_device(target.device)
    return attack


@register
class FGSM(Attack):
    """Fast Gradient Sign Method (Goodfellow et al., "Explaining and harnessing adversarial examples", ICLR 2015,
    arXiv:1412.6572).

    Norm: ``linf`` (``torchattacks.FGSM``: ``x + eps * sign(grad)``) or ``l2`` (the fast gradient method,
    ``x + eps * grad / ||grad||_2``, built as ``torchattacks.PGDL2`` with one step of size ``eps`` and no random
    start). No parameters. Shapes: x [B, C, H, W] in [0, 1], y [B] -> one [B, C, H, W] per eps.
    """

    name, backend, kind = "fgsm", "torchattacks", SINGLE_STEP
    Params = FGSMParams

    def run(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
        def attack(view, xs, ys):
            return _prepared(_TA_FGSM[self.norm](view, float(eps)), target)(xs, ys)
        return target.on_pending(x, y, eps, attack)


@register
class PGD(Attack):
    """Projected Gradient Descent (Madry et al., "Towards deep learning models resistant to adversarial attacks",
    ICLR 2018, arXiv:1706.06083): ``torchattacks.PGD`` (``linf``) / ``PGDL2`` (``l2``), cross-entropy only.

    Parameters (:class:`attacks.params.PGDParams`): ``steps`` (50), ``alpha`` (step size; ``None`` =
    ``2.5 * eps / steps``), ``random_start`` (True), ``restarts`` (5). Per sample the first iterate of any
    restart that fools the deployed forward is kept.
    """

    name, backend, kind = "pgd", "torchattacks", ITERATIVE
    Params = PGDParams

    def run(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
        p = self.params
        alpha = step_size(p.alpha, eps, p.steps)
        cls = _TA_PGD[self.norm]

        def attack(view, xs, ys):
            return _prepared(cls(view, eps=float(eps), alpha=alpha, steps=p.steps, random_start=p.random_start),
                             target)(xs, ys)

        adv = x
        for _ in range(p.restarts):  # each restart attacks only what the earlier ones left robust
            adv = target.on_pending(x, y, eps, attack)
        return adv


@dataclass(frozen=True)
class APGDParams:
    """APGD: ``steps`` (100, AutoAttack's), ``restarts`` (1), ``rho`` (step-size decay threshold, 0.75)."""

    steps: int = 100
    restarts: int = 1
    rho: float = 0.75

    def __post_init__(self) -> None:
        coerce_floats(self)
        positive_int(self, "steps", "restarts")
        positive(self, "rho")


class _APGD(Attack):
    """Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks", ICML 2020, arXiv:2003.01690): ``torchattacks.APGD``.

    Norm ``linf`` or ``l2``. Parameters (:class:`APGDParams`): ``steps`` (100), ``restarts`` (1), ``rho`` (0.75).
    The loss is fixed by the subclass (``ce`` or ``dlr``; DLR needs >= 3
    classes). The seed of the starting points is the evaluation seed.
    """

    kind = ITERATIVE
    loss: ClassVar[str] = "ce"
    Params = APGDParams

    def config(self) -> dict:
        return {"norm": self.norm, "loss": self.loss, **{k: v for k, v in super().config().items() if k != "norm"}}

    def run(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
        p = self.params

        def attack(view, xs, ys):
            return _prepared(ta.APGD(view, norm=_TA_NORM[self.norm], eps=float(eps), steps=p.steps,
                                     n_restarts=p.restarts, seed=seed, loss=self.loss, rho=p.rho), target)(xs, ys)
        return target.on_pending(x, y, eps, attack)


@register
class APGDCE(_APGD):
    __doc__ = _APGD.__doc__
    name, backend, loss = "apgd-ce", "torchattacks", "ce"


@register
class APGDDLR(_APGD):
    __doc__ = _APGD.__doc__
    name, backend, loss = "apgd-dlr", "torchattacks", "dlr"


@dataclass(frozen=True)
class SquareParams:
    """Square: ``queries`` (per restart, 5000 as in AutoAttack), ``restarts`` (1), ``p_init`` (initial fraction of
    pixels changed, 0.8)."""

    queries: int = 5000
    restarts: int = 1
    p_init: float = 0.8

    def __post_init__(self) -> None:
        coerce_floats(self)
        positive_int(self, "queries", "restarts")
        positive(self, "p_init")


@register
class Square(Attack):
    """Square Attack (Andriushchenko et al., "Square attack: a query-efficient black-box adversarial attack via
    random search", ECCV 2020, arXiv:1912.00049): ``torchattacks.Square``.

    Gradient-free random search (margin loss), so the routing gradient is irrelevant. Norm ``linf`` or ``l2``.
    Parameters (:class:`SquareParams`): ``queries`` (per restart, default 5000), ``restarts`` (1),
    ``p_init`` (0.8). A control for gradient masking only with enough queries: the square-vs-gradient check says
    whether it had the power to fire.
    """

    name, backend, kind = "square", "torchattacks", GRADIENT_FREE
    Params = SquareParams

    def run(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
        p = self.params

        def attack(view, xs, ys):
            atk = _prepared(ta.Square(view, norm=_TA_NORM[self.norm], eps=float(eps), n_queries=p.queries,
                                      n_restarts=p.restarts, p_init=p.p_init, loss="margin", seed=seed), target)
            with torch.no_grad():
                return atk(xs, ys)
        return target.on_pending(x, y, eps, attack)


@dataclass(frozen=True)
class AutoAttackParams:
    """AutoAttack: ``version`` (``standard``: APGD-CE, APGD-T, FAB-T, Square; ``rand``: APGD-CE and APGD-DLR with
    EOT, for randomised defences)."""

    version: str = "standard"

    def __post_init__(self) -> None:
        require(self.version in ("standard", "rand"), f"version must be 'standard' or 'rand', got {self.version!r}")


@register
class AutoAttack(Attack):
    """AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks", ICML 2020, arXiv:2003.01690): ``torchattacks.AutoAttack``.

    The ensemble RobustBench ranks models with, so a static twin's number can be set beside its entries (same
    threat model, same data). Norm ``linf`` or ``l2``. Parameters (:class:`AutoAttackParams`): ``version``
    (``standard``). The seed of its random parts is the evaluation seed. An ensemble of iterative attacks, so the
    routing gradient matters: ``--preset autoattack`` runs it with ``none`` and the sharpened BPDA surrogate.
    """

    name, backend, kind = "autoattack", "torchattacks", ITERATIVE
    Params = AutoAttackParams

    def run(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
        with torch.no_grad():
            classes = int(target.logits(x[:1]).shape[1])

        def attack(view, xs, ys):
            return _prepared(ta.AutoAttack(view, norm=_TA_NORM[self.norm], eps=float(eps),
                                           version=self.params.version, n_classes=classes, seed=seed), target)(xs, ys)
        return target.on_pending(x, y, eps, attack)
