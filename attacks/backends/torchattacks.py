"""torchattacks 3.5.1 behind the common :class:`attacks.base.Attack` interface.

Facts this file works around (DESIGN.md, "Library facts that bite"):

* torchattacks calls ``model(x)`` and needs one logits tensor: it gets a :class:`attacks.adapters.LogitsView`.
* Normalisation lives inside our models, so ``set_normalization_used`` is never called.
* Its CW has no search over ``c``, returns the *clean* image for samples it fails on and early-stops on the
  batch-summed cost: we run it once per ``c`` of a grid and keep, per sample, the smallest-L2 example that the
  recomputed forward misclassifies.
* Its CW takes ``max((1 - onehot) * logits)`` as the best other logit, which is 0 instead of the real maximum
  whenever every other logit is negative (EOT log-probabilities always are): CW then sees no margin to push and
  fails silently. CW therefore gets logits shifted per sample by a detached constant so all are >= 1 (margins,
  gradients and predictions unchanged).
* The device is passed explicitly (``set_device``); nothing assumes CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torchattacks as ta
from torch import nn

from attacks.base import GRADIENT_FREE, ITERATIVE, SINGLE_STEP, Attack, MinimalAttack, Target, register
from attacks.params import CWParams, FGSMParams, PGDParams, coerce_floats, positive, positive_int, step_size
from attacks.selection import keep_smallest_adversarial, select_worst

_TA_NORM = {"linf": "Linf", "l2": "L2"}


def _prepared(attack: ta.Attack, target: Target) -> ta.Attack:
    attack.set_device(target.device)
    return attack


class _PositiveLogits(nn.Module):
    """``x -> logits - min(logits) + 1`` per sample (shift detached): the same margins and gradients, all >= 1."""

    def __init__(self, view: nn.Module):
        super().__init__()
        self.view = view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.view(x)
        return z - z.min(dim=1, keepdim=True)[0].detach() + 1.0


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
        view = target.view()
        if self.norm == "linf":
            atk = ta.FGSM(view, eps=float(eps))
        else:
            atk = ta.PGDL2(view, eps=float(eps), alpha=float(eps), steps=1, random_start=False)
        return _prepared(atk, target)(x, y).detach()


@register
class PGD(Attack):
    """Projected Gradient Descent (Madry et al., "Towards deep learning models resistant to adversarial attacks",
    ICLR 2018, arXiv:1706.06083): ``torchattacks.PGD`` (``linf``) / ``PGDL2`` (``l2``).

    Parameters (:class:`attacks.params.PGDParams`): ``steps`` (10), ``alpha`` (step size; ``None`` =
    ``2.5 * eps / steps``), ``random_start`` (True), ``restarts`` (1: independent runs; per sample the first run
    that fools the deterministic forward is kept, else the one with the highest loss).
    """

    name, backend, kind = "pgd", "torchattacks", ITERATIVE
    Params = PGDParams

    def run(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
        view = target.view()
        p = self.params
        alpha = step_size(p.alpha, eps, p.steps)
        cls = ta.PGD if self.norm == "linf" else ta.PGDL2
        runs = []
        for _ in range(max(p.restarts, 1)):
            atk = _prepared(cls(view, eps=float(eps), alpha=alpha, steps=p.steps, random_start=p.random_start),
                            target)
            runs.append(atk(x, y).detach())
        return runs[0] if len(runs) == 1 else select_worst(target, runs, y)


@register
class CW(MinimalAttack):
    """Carlini-Wagner L2 (Carlini & Wagner, "Towards evaluating the robustness of neural networks", IEEE S&P 2017,
    arXiv:1608.04644): ``torchattacks.CW`` over a grid of c.

    A minimal-perturbation attack, always L2. Parameters (:class:`attacks.params.CWParams`): ``c`` (the grid of
    trade-off constants, default (0.1, 1, 10)), ``kappa`` (confidence, 0), ``steps`` (Adam steps per c, 100),
    ``lr`` (0.01); ``binary_steps`` is foolbox's and unused here. Each c is one torchattacks run; per sample the
    smallest-L2 candidate that the recomputed forward misclassifies is kept (torchattacks returns the clean image
    where it fails, which never counts). At a budget eps the example is used only if its L2 norm is <= eps;
    otherwise the clean image stands.
    """

    name, backend = "cw", "torchattacks"
    norms = ("l2",)
    Params = CWParams

    def __init__(self, norm: str = "l2", params: CWParams | None = None, **overrides):
        super().__init__(norm, params, **overrides)

    def config(self) -> dict:
        config = super().config()
        del config["binary_steps"]  # not a parameter of torchattacks' CW
        return config

    def minimize(self, target: Target, x: torch.Tensor, y: torch.Tensor,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        view = _PositiveLogits(target.view())
        p = self.params
        candidates = []
        for c in p.c:
            atk = _prepared(ta.CW(view, c=c, kappa=p.kappa, steps=p.steps, lr=p.lr), target)
            candidates.append(atk(x, y).detach().clamp(0.0, 1.0))
        return keep_smallest_adversarial(target, x, y, candidates, "l2")


@dataclass(frozen=True)
class APGDParams:
    """APGD: ``steps`` (the runner's ``steps`` unless set), ``restarts``, ``rho`` (step-size decay threshold)."""

    steps: int = 10
    restarts: int = 1
    rho: float = 0.75

    def __post_init__(self) -> None:
        coerce_floats(self)
        positive_int(self, "steps", "restarts")
        positive(self, "rho")


class _APGD(Attack):
    """Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks", ICML 2020, arXiv:2003.01690): ``torchattacks.APGD``.

    Norm ``linf`` or ``l2``. Parameters (:class:`APGDParams`): ``steps`` (default: the runner's ``steps``),
    ``restarts`` (1), ``rho`` (0.75). The loss is fixed by the subclass (``ce`` or ``dlr``; DLR needs >= 3
    classes). The seed of the starting points is the evaluation seed.
    """

    kind = ITERATIVE
    loss: ClassVar[str] = "ce"
    Params = APGDParams

    def config(self) -> dict:
        return {"norm": self.norm, "loss": self.loss, **{k: v for k, v in super().config().items() if k != "norm"}}

    def run(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
        p = self.params
        atk = _prepared(ta.APGD(target.view(), norm=_TA_NORM[self.norm], eps=float(eps), steps=p.steps,
                                n_restarts=p.restarts, seed=seed, loss=self.loss, rho=p.rho), target)
        return atk(x, y).detach()


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
    """Square: ``queries`` (per restart), ``restarts``, ``p_init`` (initial fraction of pixels changed)."""

    queries: int = 1000
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
    Parameters (:class:`SquareParams`): ``queries`` (per restart, default 1000), ``restarts`` (1),
    ``p_init`` (0.8).
    """

    name, backend, kind = "square", "torchattacks", GRADIENT_FREE
    Params = SquareParams

    def run(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
        p = self.params
        atk = _prepared(ta.Square(target.view(), norm=_TA_NORM[self.norm], eps=float(eps), n_queries=p.queries,
                                  n_restarts=p.restarts, p_init=p.p_init, loss="margin", seed=seed), target)
        with torch.no_grad():
            return atk(x, y).detach()
