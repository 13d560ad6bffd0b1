"""Gate-aware attacks that no library has (backend ``native``), and the gradient-masking probe.

* ``path``: PGD on ``CE + lambda * path term``; the path term pushes every gate score across its threshold,
  away from the clean input's decision. Gate scores are differentiable w.r.t. the input even under hard routing
  (each gate reads its block's input), so this works with every routing gradient.
* ``slowdown``: an ILFO-style energy attack (Haque et al., CVPR 2020): PGD on the smooth surrogate
  ``sum_l macs_l * sigmoid(score_l)`` of the executed MACs, optionally minus ``w * CE`` to keep the label; per
  sample the iterate with the most *executed* MACs is kept (the clean input included, so MACs never drop in a
  deterministic gate mode). On an ungated model MACs cannot change and the clean input is returned.
* frozen-path control and transfer are carried out by :mod:`attacks.runner` (every adversarial example is also
  evaluated with the gates frozen to its clean path; ``--transfer-from`` crafts on another run's model).

Both attacks run our own PGD loop (:func:`native_pgd`) in ``linf`` or ``l2``. Both compute the clean input's gate
scores (or MACs) once for all budgets: a forward in ``random`` mode or under ``eot`` draws random numbers, so a
per-budget recomputation would change every later draw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.nn import functional as F

from attacks.base import COMPUTE, ITERATIVE, Attack, Target, register
from attacks.params import coerce_floats, non_negative, positive, positive_int, step_size
from robustness.core.norms import norm_for

Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def project(adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """``adv`` moved into the ``norm`` ball of radius ``eps`` (one float, or one per sample [B]) around ``x`` and
    into [0, 1] (:meth:`robustness.core.norms.Norm.project`, then the clipping)."""
    return (x + norm_for(norm).project(adv - x, eps)).clamp(0.0, 1.0)


def start_point(x: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """A random start in the ``norm`` ball of radius ``eps`` (one float, or one per sample [B]) and in [0, 1]
    (:meth:`robustness.core.norms.Norm.random_start`: uniform in the ``linf`` cube; a random direction at a uniform
    radius in the ``l2`` ball)."""
    return norm_for(norm).random_start(x, eps)


def native_pgd(objective: Objective, x: torch.Tensor, eps: float, norm: str, steps: int, alpha: float,
               random_start: bool = True, keep_best: torch.Tensor | None = None) -> torch.Tensor:
    """Maximise ``objective`` within the ``norm`` ball of radius ``eps`` around ``x`` (and in [0, 1]).

    ``objective(adv)`` returns ``(loss [B], score [B] or None)``. Without ``keep_best`` the last iterate is returned.
    With ``keep_best`` (the clean input's score [B]), per sample the iterate with the highest ``score`` is returned
    (the clean input when no iterate beats it); the score of the final iterate is evaluated too.
    Steps: ``linf`` moves by ``alpha * sign(grad)``, ``l2`` by ``alpha * grad / ||grad||_2``; then projection.
    """
    ball = norm_for(norm)
    adv = start_point(x, eps, norm) if random_start else x.clone()
    best, best_score = (x.clone(), keep_best.clone()) if keep_best is not None else (None, None)

    def remember(candidate: torch.Tensor, score: torch.Tensor | None) -> None:
        nonlocal best_score
        if best is None or score is None:
            return
        better = score.detach() > best_score
        best[better] = candidate.detach()[better]
        best_score = torch.where(better, score.detach(), best_score)

    for _ in range(int(steps)):
        adv = adv.detach().requires_grad_(True)
        loss, score = objective(adv)
        remember(adv, score)
        grad, = torch.autograd.grad(loss.sum(), adv, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(adv)
        with torch.no_grad():
            adv = project(adv + alpha * ball.ascent(grad), x, eps, norm)
    adv = adv.detach()
    if best is None:
        return adv
    with torch.no_grad():
        _, score = objective(adv)
    remember(adv, score)
    return best


@dataclass(frozen=True)
class PathParams:
    """Path attack: ``lam`` (weight of the path term), ``margin`` (how far past its threshold a score must go),
    ``steps`` (the runner's ``steps`` unless set), ``alpha`` (``None`` = ``2.5 * eps / steps``), ``random_start``."""

    lam: float = 1.0
    margin: float = 1.0
    steps: int = 10
    alpha: float | None = None
    random_start: bool = True

    def __post_init__(self) -> None:
        coerce_floats(self)
        positive_int(self, "steps")
        positive(self, "alpha")
        non_negative(self, "lam", "margin")


@register
class PathAttack(Attack):
    """Path attack (ours; path term in the spirit of ILFO, Haque et al., CVPR 2020): PGD maximising
    ``CE + lambda * mean_l -max(s_l * d_l, -margin)``.

    ``s_l`` is gate l's score on the current input, ``d_l = +1`` if the gate ran on the clean input else ``-1``:
    the term rewards moving every score across its threshold, away from the clean decision, until it is
    ``margin`` past it. Norm ``linf`` or ``l2``. Parameters (:class:`PathParams`): ``lam`` (lambda, default 1),
    ``margin`` (1), ``steps`` (the runner's ``steps``), ``alpha`` (``None`` = ``2.5 * eps / steps``),
    ``random_start`` (True). On an ungated model the term is zero and the attack is PGD.
    """

    name, backend, kind = "path", "native", ITERATIVE
    Params = PathParams

    def perturb(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float],
                seed: int) -> list[torch.Tensor]:
        p = self.params
        with torch.no_grad():
            clean_scores = target.forward(x).path_scores
        direction = torch.where(clean_scores > 0, 1.0, -1.0)

        def objective(adv: torch.Tensor) -> tuple[torch.Tensor, None]:
            out = target.forward(adv)
            logits = out.logits(target.head)
            target.offer(adv, logits if target.deployed_logits else None)
            loss = F.cross_entropy(logits.float(), y, reduction="none")
            if direction.shape[1]:
                term = -(out.path_scores * direction).clamp(min=-p.margin)
                loss = loss + p.lam * term.mean(1)
            return loss, None

        return [native_pgd(objective, x, float(e), self.norm, p.steps, step_size(p.alpha, e, p.steps),
                           p.random_start) for e in eps]


@dataclass(frozen=True)
class SlowdownParams:
    """Slowdown attack: ``steps`` (the runner's ``steps`` unless set), ``alpha`` (``None`` = ``2.5 * eps / steps``),
    ``random_start``, ``label_weight`` (weight of the CE penalty that keeps the prediction; 0: none)."""

    steps: int = 10
    alpha: float | None = None
    random_start: bool = True
    label_weight: float = 0.0

    def __post_init__(self) -> None:
        coerce_floats(self)
        positive_int(self, "steps")
        positive(self, "alpha")
        non_negative(self, "label_weight")


@register
class SlowdownAttack(Attack):
    """Slowdown / energy attack (ILFO, Haque, Chauhan, Yang, CVPR 2020; DeepSloth, Hong et al., ICLR 2021).

    PGD maximising ``sum_l macs_l * sigmoid(s_l) / full_macs - label_weight * CE`` (``label_weight`` > 0 keeps
    the prediction, a stealthier attack). Per sample the iterate with the most executed MACs is kept, starting
    from the clean input. Its target is compute, not the label: kind ``compute``, left out of accuracy and the
    worst case. Norm ``linf`` or ``l2``. Parameters (:class:`SlowdownParams`): ``steps`` (the runner's
    ``steps``), ``alpha`` (``None`` = ``2.5 * eps / steps``), ``random_start`` (True), ``label_weight`` (0).
    On an ungated model it returns the clean input (MACs cannot change). A model that reports no per-block MACs
    (a :class:`models.protocol.GatedModel`) weighs every gate alike.
    """

    name, backend, kind = "slowdown", "native", COMPUTE
    Params = SlowdownParams

    def perturb(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float],
                seed: int) -> list[torch.Tensor]:
        model = target.model
        if not model.is_gated:
            return [x.clone() for _ in eps]
        p = self.params
        with torch.no_grad():
            clean_macs = target.forward(x).macs.double()
        # after a forward: an adapted model (models.protocol) counts its costs on its first one; a model that
        # reports no per-block MACs (a protocol GatedModel) weighs its gates alike
        blocks = model.costs.gated_blocks or (1.0,) * model.n_gates
        costs = torch.tensor(blocks, dtype=torch.float32, device=x.device)
        scale = float(model.full_macs) or float(sum(blocks)) or 1.0

        def objective(adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = target.forward(adv)
            loss = (torch.sigmoid(out.path_scores) * costs).sum(1) / scale
            if p.label_weight:
                loss = loss - p.label_weight * F.cross_entropy(out.logits(target.head).float(), y,
                                                               reduction="none")
            return loss, out.macs.detach().double()

        return [native_pgd(objective, x, float(e), self.norm, p.steps, step_size(p.alpha, e, p.steps),
                           p.random_start, keep_best=clean_macs) for e in eps]
