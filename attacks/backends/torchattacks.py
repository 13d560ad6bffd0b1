"""torchattacks 3.5.1 behind the common :class:`attacks.backends.Attack` interface.

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

from typing import Any, Sequence

import torch
import torchattacks as ta
from torch import nn

from attacks.backends import (Attack, Target, keep_smallest_adversarial, register, select_worst, step_size,
                              within_budgets)

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
    """Fast Gradient Sign Method (Goodfellow et al., ICLR 2015, arXiv:1412.6572).

    Norm: ``linf`` (``torchattacks.FGSM``: ``x + eps * sign(grad)``) or ``l2`` (the fast gradient method,
    ``x + eps * grad / ||grad||_2``, built as ``torchattacks.PGDL2`` with one step of size ``eps`` and no random
    start). No parameters. Shapes: x [B, C, H, W] in [0, 1], y [B] -> one [B, C, H, W] per eps.
    """

    name, backend = "fgsm", "torchattacks"
    reference = "Goodfellow et al., Explaining and harnessing adversarial examples, ICLR 2015"

    def perturb(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float],
                seed: int) -> list[torch.Tensor]:
        view = target.view()
        out = []
        for e in eps:
            if self.norm == "linf":
                atk = ta.FGSM(view, eps=float(e))
            else:
                atk = ta.PGDL2(view, eps=float(e), alpha=float(e), steps=1, random_start=False)
            out.append(_prepared(atk, target)(x, y).detach())
        return out


@register
class PGD(Attack):
    """Projected Gradient Descent (Madry et al., ICLR 2018, arXiv:1706.06083): ``torchattacks.PGD`` / ``PGDL2``.

    Parameters: ``steps`` (default 10), ``alpha`` (step size; ``None`` = ``2.5 * eps / steps``),
    ``random_start`` (default True), ``restarts`` (default 1: independent runs; per sample the first run that
    fools the deterministic forward is kept, else the one with the highest loss).
    """

    name, backend = "pgd", "torchattacks"
    reference = "Madry et al., Towards deep learning models resistant to adversarial attacks, ICLR 2018"

    def __init__(self, norm: str = "linf", steps: int = 10, alpha: float | None = None, random_start: bool = True,
                 restarts: int = 1):
        super().__init__(norm, steps=int(steps), alpha=alpha, random_start=bool(random_start),
                         restarts=int(restarts))

    @classmethod
    def from_config(cls, config: Any, norm: str) -> "PGD":
        return cls(norm, steps=config.steps, alpha=config.pgd_alpha, random_start=config.pgd_random_start,
                   restarts=config.pgd_restarts)

    def perturb(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float],
                seed: int) -> list[torch.Tensor]:
        view = target.view()
        p = self.params
        out = []
        for e in eps:
            alpha = step_size(p["alpha"], e, p["steps"])
            cls = ta.PGD if self.norm == "linf" else ta.PGDL2
            runs = []
            for _ in range(max(p["restarts"], 1)):
                atk = _prepared(cls(view, eps=float(e), alpha=alpha, steps=p["steps"],
                                    random_start=p["random_start"]), target)
                runs.append(atk(x, y).detach())
            out.append(runs[0] if len(runs) == 1 else select_worst(target, runs, y))
        return out


@register
class CW(Attack):
    """Carlini-Wagner L2 (Carlini & Wagner, IEEE S&P 2017, arXiv:1608.04644): ``torchattacks.CW`` over a c grid.

    A minimal-perturbation attack, always L2. Parameters: ``c`` (grid of trade-off constants, default
    (0.1, 1, 10)), ``kappa`` (confidence, 0), ``steps`` (Adam steps per c, 100), ``lr`` (0.01). Each c is one
    torchattacks run; per sample the smallest-L2 candidate that the recomputed forward misclassifies is kept
    (torchattacks returns the clean image where it fails, which never counts). At a budget eps the example is
    used only if its L2 norm is <= eps; otherwise the clean image stands.
    """

    name, backend = "cw", "torchattacks"
    norms = ("l2",)
    minimal = True
    reference = "Carlini & Wagner, Towards evaluating the robustness of neural networks, IEEE S&P 2017"

    def __init__(self, norm: str = "l2", c: Sequence[float] = (0.1, 1.0, 10.0), kappa: float = 0.0,
                 steps: int = 100, lr: float = 0.01):
        super().__init__(norm, c=[float(v) for v in c], kappa=float(kappa), steps=int(steps), lr=float(lr))

    @classmethod
    def from_config(cls, config: Any, norm: str) -> "CW":
        return cls("l2", c=config.cw_c, kappa=config.cw_kappa, steps=config.cw_steps, lr=config.cw_lr)

    def perturb(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float],
                seed: int) -> list[torch.Tensor]:
        view = _PositiveLogits(target.view())
        p = self.params
        candidates = []
        for c in p["c"]:
            atk = _prepared(ta.CW(view, c=c, kappa=p["kappa"], steps=p["steps"], lr=p["lr"]), target)
            candidates.append(atk(x, y).detach().clamp(0.0, 1.0))
        best, found = keep_smallest_adversarial(target, x, y, candidates, "l2")
        return within_budgets(x, best, found, eps, "l2")


class _APGD(Attack):
    """Auto-PGD (Croce & Hein, ICML 2020, arXiv:2003.01690): ``torchattacks.APGD``.

    Norm ``linf`` or ``l2``. Parameters: ``steps`` (default 10 via the runner's ``steps``), ``restarts`` (1),
    ``rho`` (0.75). The loss is fixed by the subclass (``ce`` or ``dlr``; DLR needs >= 3 classes). The seed of
    the starting points is derived from the evaluation seed.
    """

    loss: str = "ce"
    reference = "Croce & Hein, Reliable evaluation of adversarial robustness with an ensemble of diverse " \
                "parameter-free attacks, ICML 2020"

    def __init__(self, norm: str = "linf", steps: int = 10, restarts: int = 1, rho: float = 0.75):
        super().__init__(norm, loss=self.loss, steps=int(steps), restarts=int(restarts), rho=float(rho))

    @classmethod
    def from_config(cls, config: Any, norm: str) -> "_APGD":
        return cls(norm, steps=config.apgd_steps or config.steps, restarts=config.apgd_restarts)

    def perturb(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float],
                seed: int) -> list[torch.Tensor]:
        view = target.view()
        p = self.params
        out = []
        for e in eps:
            atk = _prepared(ta.APGD(view, norm=_TA_NORM[self.norm], eps=float(e), steps=p["steps"],
                                    n_restarts=p["restarts"], seed=seed, loss=self.loss, rho=p["rho"]), target)
            out.append(atk(x, y).detach())
        return out


@register
class APGDCE(_APGD):
    __doc__ = _APGD.__doc__
    name, backend, loss = "apgd-ce", "torchattacks", "ce"


@register
class APGDDLR(_APGD):
    __doc__ = _APGD.__doc__
    name, backend, loss = "apgd-dlr", "torchattacks", "dlr"


@register
class Square(Attack):
    """Square Attack (Andriushchenko et al., ECCV 2020, arXiv:1912.00049): ``torchattacks.Square``.

    Gradient-free random search (margin loss), so the routing gradient is irrelevant. Norm ``linf`` or ``l2``.
    Parameters: ``queries`` (per restart, default 1000), ``restarts`` (1), ``p_init`` (0.8).
    """

    name, backend = "square", "torchattacks"
    gradient_free = True
    reference = "Andriushchenko et al., Square attack: a query-efficient black-box adversarial attack via " \
                "random search, ECCV 2020"

    def __init__(self, norm: str = "linf", queries: int = 1000, restarts: int = 1, p_init: float = 0.8):
        super().__init__(norm, queries=int(queries), restarts=int(restarts), p_init=float(p_init))

    @classmethod
    def from_config(cls, config: Any, norm: str) -> "Square":
        return cls(norm, queries=config.square_queries, restarts=config.square_restarts,
                   p_init=config.square_p_init)

    def perturb(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float],
                seed: int) -> list[torch.Tensor]:
        view = target.view()
        p = self.params
        out = []
        for e in eps:
            atk = _prepared(ta.Square(view, norm=_TA_NORM[self.norm], eps=float(e), n_queries=p["queries"],
                                      n_restarts=p["restarts"], p_init=p["p_init"], loss="margin", seed=seed),
                            target)
            with torch.no_grad():
                out.append(atk(x, y).detach())
        return out
