"""The suite's own PGD (backend ``native``): CE and margin losses, restarts, the first fooling iterate kept.

Library PGDs (torchattacks, foolbox) optimise cross-entropy only and return their last iterate. This one is what a
robustness paper would run (Madry et al. 2018 with the margin loss of Carlini & Wagner 2017, as AutoAttack pairs
CE with a margin-type loss): ``restarts`` random starts per loss, ``steps`` steps each, and, through the attack's
:class:`attacks.tracking.BestAdversarial`, per sample the first iterate of any run that fools the *deployed*
forward. Samples already fooled (or misclassified clean) are dropped from the batch as soon as they are, so later
runs cost only what is still robust.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from attacks.backends.native import project, start_point
from attacks.base import ITERATIVE, Attack, Target, register
from attacks.params import PGDParams, require, step_size
from attacks.tracking import BestAdversarial


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j != y} z_j - z_y`` per sample (Carlini & Wagner's margin, unclamped: it keeps pushing)."""
    z = logits.float()
    true = z.gather(1, y.view(-1, 1)).squeeze(1)
    other = z.scatter(1, y.view(-1, 1), float("-inf")).amax(1)
    return other - true


LOSSES = {"ce": ce_loss, "margin": margin_loss}


@dataclass(frozen=True)
class NativePGDParams(PGDParams):
    """PGD parameters plus ``losses`` (run in turn, ``restarts`` runs each: ``ce``, ``margin``)."""

    losses: tuple[str, ...] = ("ce", "margin")

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "losses", tuple(str(v) for v in self.losses))
        require(bool(self.losses) and all(v in LOSSES for v in self.losses),
                f"losses must be some of {', '.join(LOSSES)}, got {list(self.losses)}")


@register
class PGD(Attack):
    """Projected gradient descent (Madry et al., "Towards deep learning models resistant to adversarial attacks",
    ICLR 2018, arXiv:1706.06083) with CE and margin losses and restarts.

    Norm ``linf`` (sign steps) or ``l2`` (normalised-gradient steps), then projection onto the ball and [0, 1].
    Parameters (:class:`NativePGDParams`): ``steps`` (50), ``alpha`` (step size; ``None`` = ``2.5 * eps /
    steps``), ``random_start`` (True), ``restarts`` (5 per loss), ``losses`` (``ce``, ``margin``). Per sample the
    first iterate of any run that fools the deployed forward is returned, else the lowest-margin one. Shapes: x
    [B, C, H, W] in [0, 1], y [B] -> one [B, C, H, W] per eps.
    """

    name, backend, kind = "pgd", "native", ITERATIVE
    Params = NativePGDParams

    def run(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
        if target.tracker is None:  # called outside Attack.__call__ (tests, scripts): track here
            target = dataclasses.replace(target, tracker=BestAdversarial(target, x, y, [eps], self.norm,
                                                                         keep_first=target.keep_first))
        tracker = target.tracker
        k = tracker.budget_index(eps)
        p = self.params
        alpha = step_size(p.alpha, eps, p.steps)
        for _ in range(p.restarts):
            for loss_name in p.losses:
                index = tracker.pending(eps)
                if index.numel() == 0:
                    return tracker.best(k)
                self._one_run(target, x, y, index, eps, alpha, LOSSES[loss_name])
        return tracker.best(k)

    def _one_run(self, target: Target, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, eps: float,
                 alpha: float, loss_fn) -> None:
        """One run from a (random) start on the samples ``index``, dropping each as soon as it is fooled."""
        tracker, k = target.tracker, target.tracker.budget_index(eps)
        xs, ys = x.index_select(0, index), y.index_select(0, index)
        adv = start_point(xs, eps, self.norm) if self.params.random_start else xs.clone()
        for _ in range(self.params.steps):
            adv = adv.detach().requires_grad_(True)
            logits = target.forward(adv).logits(target.head)
            target.offer(adv, logits if target.deployed_logits else None, index)
            grad, = torch.autograd.grad(loss_fn(logits, ys).sum(), adv, allow_unused=True)
            with torch.no_grad():
                step = torch.zeros_like(adv) if grad is None else _direction(grad, self.norm)
                adv = project(adv + alpha * step, xs, eps, self.norm)
            alive = ~tracker.fooled(k).index_select(0, index)
            if not alive.all():
                index, xs, ys, adv = index[alive], xs[alive], ys[alive], adv[alive]
                if index.numel() == 0:
                    return
        target.offer(adv, None, index)


def _direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return grad.sign()
    shape = (-1,) + (1,) * (grad.dim() - 1)
    return grad / grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12).view(shape)
