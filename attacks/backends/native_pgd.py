"""The suite's own PGD (backend ``native``): CE and margin losses, restarts, the first fooling iterate kept.

Library PGDs (torchattacks, foolbox) optimise cross-entropy only and return their last iterate. This one is what a
robustness paper would run (Madry et al. 2018 with the margin loss of Carlini & Wagner 2017, as AutoAttack pairs
CE with a margin-type loss): ``restarts`` random starts per loss, ``steps`` steps each, and, through the attack's
:class:`attacks.tracking.BestAdversarial`, per sample the first iterate of any run that fools the *deployed*
forward. Samples already fooled (or misclassified clean) are dropped from the batch as soon as they are, so later
runs cost only what is still robust.

Opt-in adaptive budget (``max_steps``): a fixed step count is not converged at large eps, so with ``max_steps`` set
a run takes its ``steps`` steps and then goes on in windows of ``steps`` more while the deployed margin of some
sample it still attacks keeps falling (by more than ``stall_tol`` over a window), up to ``max_steps`` steps in all.
The step size stays the base window's, ``2.5 * eps / steps``: the extra steps explore further inside the same ball.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from attacks.backends.native import project, start_point
from attacks.base import ITERATIVE, Attack, Target, register
from attacks.params import PGDParams, non_negative, require, step_size
from attacks.tracking import BestAdversarial, deployed_margin
from robustness.core.norms import norm_for

#: ``stall_tol`` when ``max_steps`` is set and ``stall_tol`` is not: a window must lower some sample's best deployed
#: margin by more than this (logit units) for the run to go on
DEFAULT_STALL_TOL = 1e-3


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
    """PGD parameters plus ``losses`` (run in turn, ``restarts`` runs each: ``ce``, ``margin``), ``max_steps``
    (None: every run takes exactly ``steps`` steps; else a run goes on past ``steps``, ``steps`` at a time, while
    its deployed margin still falls, up to ``max_steps`` steps in all; must be >= ``steps``) and ``stall_tol``
    (with ``max_steps``: how much, in logit units, a window must lower some sample's best deployed margin for the
    run to go on; None: ``1e-3``; must be >= 0; no effect without ``max_steps``).

    Both new fields stay None unless ``max_steps`` is set, so the recorded parameters of a default PGD are those
    of the versions before them (stored runs resume)."""

    losses: tuple[str, ...] = ("ce", "margin")
    max_steps: int | None = None
    stall_tol: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "losses", tuple(str(v) for v in self.losses))
        require(bool(self.losses) and all(v in LOSSES for v in self.losses),
                f"losses must be some of {', '.join(LOSSES)}, got {list(self.losses)}")
        if self.max_steps is not None:
            require(isinstance(self.max_steps, int) and not isinstance(self.max_steps, bool)
                    and self.max_steps >= self.steps,
                    f"max_steps must be an integer >= steps ({self.steps}) or unset, got {self.max_steps!r}")
            if self.stall_tol is None:
                object.__setattr__(self, "stall_tol", DEFAULT_STALL_TOL)
        if self.stall_tol is not None:
            non_negative(self, "stall_tol")


@register
class PGD(Attack):
    """Projected gradient descent (Madry et al., "Towards deep learning models resistant to adversarial attacks",
    ICLR 2018, arXiv:1706.06083) with CE and margin losses and restarts.

    Norm ``linf`` (sign steps) or ``l2`` (normalised-gradient steps), then projection onto the ball and [0, 1].
    Parameters (:class:`NativePGDParams`): ``steps`` (50), ``alpha`` (step size; ``None`` = ``2.5 * eps /
    steps``), ``random_start`` (True), ``restarts`` (5 per loss), ``losses`` (``ce``, ``margin``), ``max_steps``
    (None: ``steps`` per run), ``stall_tol`` (``1e-3`` when ``max_steps`` is set). Per sample the first iterate
    of any run that fools the deployed forward is returned, else the lowest-margin one. Shapes: x [B, C, H, W] in
    [0, 1], y [B] -> one [B, C, H, W] per eps.

    ``max_steps`` because a fixed step count is not converged at large eps: a run takes ``steps`` steps, then
    windows of ``steps`` more while the best deployed margin (``z_y - max_{j != y} z_j``) of at least one sample it
    still attacks fell by more than ``stall_tol`` over the last window, up to ``max_steps`` in all (the last
    window cut short). Window ``k`` is judged on the iterates it made against the best margin before it, the first
    on the start point. Pitfall: the step size is tied to ``steps``, not ``max_steps`` (``2.5 * eps / steps``
    unless ``alpha`` is set), so raising ``max_steps`` lets a run walk further at the same step, never with
    finer steps; ``steps`` = ``max_steps`` is exactly the fixed-step PGD.
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
        """One run from a (random) start on the samples ``index``, dropping each as soon as it is fooled: ``steps``
        steps, or with ``max_steps`` windows of ``steps`` until the deployed margin stalls (:class:`PGD`)."""
        tracker, k = target.tracker, target.tracker.budget_index(eps)
        p = self.params
        xs, ys = x.index_select(0, index), y.index_select(0, index)
        adv = start_point(xs, eps, self.norm) if p.random_start else xs.clone()
        adaptive = p.max_steps is not None and p.max_steps > p.steps
        total = p.max_steps if adaptive else p.steps
        best = reference = None  # adaptive: per sample of ``index`` the best deployed margin so far / before the window
        for t in range(total):
            adv = adv.detach().requires_grad_(True)
            logits = target.forward(adv).logits(target.head)
            if not adaptive:
                target.offer(adv, logits if target.deployed_logits else None, index)
            else:
                with torch.no_grad():
                    deployed = logits.detach() if target.deployed_logits else target.logits(adv.detach())
                target.offer(adv, deployed, index)
                margin = deployed_margin(deployed, ys)
                margin = torch.where(torch.isfinite(margin), margin, torch.full_like(margin, math.inf))
                best = margin if best is None else torch.minimum(best, margin)
                if t % p.steps == 0:  # a window boundary: iterate t closes the window before it
                    alive = ~tracker.fooled(k).index_select(0, index)
                    if not alive.any():
                        return
                    if t > 0 and not bool((best < reference - p.stall_tol)[alive].any()):
                        return  # stalled: iterate t was offered already
                    reference = best.clone()
            grad, = torch.autograd.grad(loss_fn(logits, ys).sum(), adv, allow_unused=True)
            with torch.no_grad():
                step = torch.zeros_like(adv) if grad is None else norm_for(self.norm).ascent(grad)
                adv = project(adv + alpha * step, xs, eps, self.norm)
            alive = ~tracker.fooled(k).index_select(0, index)
            if not alive.all():
                index, xs, ys, adv = index[alive], xs[alive], ys[alive], adv[alive]
                if adaptive:
                    best, reference = best[alive], reference[alive]
                if index.numel() == 0:
                    return
        target.offer(adv, None, index)

