"""foolbox 3.3.4 behind the common :class:`attacks.base.Attack` interface.

Facts this file works around (DESIGN.md, "Library facts that bite"):

* ``raw, clipped, success = attack(fmodel, x, y, epsilons=[...])``: one call sweeps the budget list. Only
  ``clipped`` is guaranteed within eps, so only ``clipped`` is used; ``success`` is ignored (it is True for inputs
  that were already misclassified) and success is recomputed by the runner.
* ``PyTorchModel`` defaults to ``cuda:0`` when CUDA exists: the device is always passed explicitly, and the model
  is a :class:`attacks.adapters.LogitsView` in eval mode with ``bounds=(0, 1)`` (normalisation is in the model).
* LinfPGD's defaults (40 steps of 0.033 eps) differ from torchattacks'; steps and step size are set from our
  PGD configuration so the two backends run the same attack.
* L2CarliniWagnerAttack returns an all-zero image for samples it fails on; a CW example is used at a budget only
  when its L2 norm is within it and the recomputed forward misclassifies it, otherwise the clean image stands.
  CW is a minimal attack that is nevertheless *not* a :class:`attacks.base.MinimalAttack`: foolbox returns the
  budget's ``clipped`` image ``x + (raw - x)``, which is not ``raw`` in float arithmetic, and that is what is used.
"""
from __future__ import annotations

from typing import Any, Sequence

import foolbox as fb
import torch

from attacks.base import ITERATIVE, MINIMAL, SINGLE_STEP, Attack, Target, register
from attacks.checks import sample_norms
from attacks.params import CWParams, FGSMParams, PGDParams
from attacks.selection import select_worst

_PGD = {"linf": fb.attacks.LinfPGD, "l2": fb.attacks.L2PGD}
_FGM = {"linf": fb.attacks.LinfFastGradientAttack, "l2": fb.attacks.L2FastGradientAttack}


def _fmodel(target: Target) -> fb.PyTorchModel:
    return fb.PyTorchModel(target.view(), bounds=(0.0, 1.0), device=target.device)


def _clipped(attack: Any, target: Target, x: torch.Tensor, y: torch.Tensor,
             eps: Sequence[float]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    raw, clipped, _success = attack(_fmodel(target), x, y, epsilons=[float(e) for e in eps])
    return [r.detach() for r in raw], [c.detach() for c in clipped]


@register
class FGSM(Attack):
    """Fast gradient (sign) method (Goodfellow et al., "Explaining and harnessing adversarial examples", ICLR 2015,
    arXiv:1412.6572): ``LinfFastGradientAttack`` (``linf``) or ``L2FastGradientAttack`` (``l2``), no random start,
    all budgets in one foolbox call. No parameters. Shapes: x [B, C, H, W] in [0, 1], y [B].
    """

    name, backend, kind = "fgsm", "foolbox", SINGLE_STEP
    Params = FGSMParams

    def perturb(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float],
                seed: int) -> list[torch.Tensor]:
        return _clipped(_FGM[self.norm](random_start=False), target, x, y, eps)[1]


@register
class PGD(Attack):
    """Projected gradient descent (Madry et al., "Towards deep learning models resistant to adversarial attacks",
    ICLR 2018, arXiv:1706.06083): ``LinfPGD`` / ``L2PGD``, all budgets in one foolbox call per restart.

    Parameters as torchattacks' PGD (:class:`attacks.params.PGDParams`): ``steps`` (10), ``alpha`` (absolute
    step; ``None`` = ``2.5 * eps / steps``, passed as ``rel_stepsize = 2.5 / steps``), ``random_start`` (True),
    ``restarts`` (1; per sample the first fooling run is kept, else the highest-loss one).
    """

    name, backend, kind = "pgd", "foolbox", ITERATIVE
    Params = PGDParams

    def perturb(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float],
                seed: int) -> list[torch.Tensor]:
        p = self.params
        if p.alpha is None:
            attack = _PGD[self.norm](rel_stepsize=2.5 / p.steps, steps=p.steps, random_start=p.random_start)
        else:
            attack = _PGD[self.norm](abs_stepsize=float(p.alpha), steps=p.steps, random_start=p.random_start)
        runs = [_clipped(attack, target, x, y, eps)[1] for _ in range(max(p.restarts, 1))]
        if len(runs) == 1:
            return runs[0]
        return [select_worst(target, [run[k] for run in runs], y) for k in range(len(eps))]


@register
class CW(Attack):
    """Carlini-Wagner L2 (Carlini & Wagner, "Towards evaluating the robustness of neural networks", IEEE S&P 2017,
    arXiv:1608.04644) with foolbox's binary search over c, all budgets in one foolbox call.

    Always L2, minimal-perturbation. Parameters (:class:`attacks.params.CWParams`): ``c`` (the smallest value
    starts the search, default 0.1), ``binary_steps`` (5), ``steps`` (Adam steps per search step, 100), ``lr``
    (0.01), ``kappa`` (0). At a budget eps the example is used only where its L2 norm is <= eps (then
    ``clipped`` equals it up to rounding) and the recomputed forward misclassifies it; elsewhere the clean image
    stands.
    """

    name, backend, kind = "cw", "foolbox", MINIMAL
    norms = ("l2",)
    Params = CWParams

    def __init__(self, norm: str = "l2", params: CWParams | None = None, **overrides: Any):
        super().__init__(norm, params, **overrides)

    def config(self) -> dict[str, Any]:
        p = self.params
        return {"norm": self.norm, "initial_c": float(min(p.c)), "binary_steps": p.binary_steps, "steps": p.steps,
                "lr": p.lr, "kappa": p.kappa}

    def perturb(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float],
                seed: int) -> list[torch.Tensor]:
        p = self.params
        attack = fb.attacks.L2CarliniWagnerAttack(binary_search_steps=p.binary_steps, steps=p.steps,
                                                  stepsize=p.lr, confidence=p.kappa,
                                                  initial_const=float(min(p.c)), abort_early=True)
        raw, clipped = _clipped(attack, target, x, y, eps)
        best = raw[0]
        wrong = target.logits(best).argmax(1) != y
        norms = sample_norms(best - x, "l2")
        shape = (-1,) + (1,) * (x.dim() - 1)
        return [torch.where((wrong & (norms <= float(e))).view(shape), c, x) for e, c in zip(eps, clipped)]
