"""Per-sample minimal distance by bisection over eps with the suite's PGD (backend ``native``, attack ``pgd-bisect``).

The minimal-norm attacks of the libraries (DDN, FMN, CW) optimise a surrogate of "smallest fooling
perturbation" and can stop short; a fixed-budget PGD with restarts is the strongest attack the field trusts, but
answers only "is there an example within eps?". Asking that question per sample at a shrinking bracket of eps
gives the smallest budget at which *that* PGD fools the sample (Carlini et al., "On evaluating adversarial
robustness", 2019, sec. 5: report the minimal distance curve, found by search over eps):

1. **bracket**: each sample starts at ``start``; a budget PGD fools is halved, one it does not is doubled, until
   the sample has a budget it survives (``lo``) and a fooling example (``hi`` = that example's norm), or the
   budget leaves [``start`` / 2**10, ``max_eps``] (not found above: distance inf; fooled below: lo = 0);
2. **bisection**: ``search_steps`` probes at the geometric midpoint ``sqrt(lo * hi)`` (the arithmetic one while
   lo = 0); after ``k`` steps ``hi / lo <= 2 ** (1 / 2**k)`` (6 steps: 1.1%).

Each probe is the native PGD at a per-sample eps: ``restarts`` runs per loss (CE and margin), ``steps`` steps of
``2.5 * eps / steps``, every iterate checked against the *deployed* forward and a sample dropped at its first
fooling iterate, which is kept. A sample's result is the smallest fooling example of all probes. Its parameters
follow the run's PGD (``steps``, ``restarts``, ``losses``, ``random_start`` of ``[attack.pgd]``) unless
``[attack.pgd-bisect]`` sets them: the search is exactly as strong as the fixed-budget PGD at every eps it probes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from attacks.backends.native import project, start_point
from attacks.backends.native_pgd import LOSSES, NativePGDParams
from attacks.base import MinimalAttack, Target, register
from attacks.checks import sample_norms
from attacks.params import positive, positive_int
from robustness.core.norms import norm_for, per_sample

#: How far below ``start`` the bracket looks for a budget the sample survives before calling lo = 0.
_MIN_FACTOR = 2.0 ** -10


@dataclass(frozen=True)
class BisectParams(NativePGDParams):
    """PGD's parameters (per probe; ``alpha`` must stay ``None``: the step follows each probe's eps) plus
    ``search_steps`` (6 bisection probes after the bracket), ``start`` (first budget; ``None``: 1/255 for linf,
    0.25 for l2) and ``max_eps`` (largest budget tried; ``None``: 0.5 for linf, the diagonal of the image cube,
    ``sqrt(C * H * W)``, for l2, which bounds every L2 distance in [0, 1])."""

    restarts: int = 1
    search_steps: int = 6
    start: float | None = None
    max_eps: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(self, "search_steps")
        positive(self, "start", "max_eps")
        if self.alpha is not None:
            raise ValueError("alpha must be unset (None): each probe steps 2.5 * eps / steps at its own eps")
        if self.max_steps is not None or self.stall_tol is not None:
            raise ValueError("max_steps and stall_tol are the fixed-budget PGD's: each probe runs exactly steps")


#: (start, max_eps) of the search per norm when the parameters leave them unset; ``None``: the L2 diameter of
#: [0, 1]^d, which bounds every L2 distance (and caps a larger ``max_eps``).
_DEFAULT_LIMITS: dict[str, tuple[float, float | None]] = {"linf": (1 / 255, 0.5), "l2": (0.25, None)}


def _limits(params: BisectParams, norm: str, x: torch.Tensor) -> tuple[float, float]:
    """(start, max_eps) of the search (:data:`_DEFAULT_LIMITS`)."""
    start, largest = _DEFAULT_LIMITS[norm]
    if largest is not None:
        return params.start or start, params.max_eps or largest
    diameter = math.sqrt(x[0].numel())
    return params.start or start, min(params.max_eps or diameter, diameter)


@register
class PGDBisect(MinimalAttack):
    """Minimal distance per sample by bracketing and bisection over eps with PGD (CE and margin losses).

    Norm ``linf`` or ``l2``. Parameters (:class:`BisectParams`; ``steps``, ``restarts``, ``losses`` and
    ``random_start`` default to the run's PGD): ``steps`` (50), ``restarts`` (1 per loss), ``losses`` (``ce``,
    ``margin``), ``random_start`` (True), ``search_steps`` (6), ``start`` (1/255 linf, 0.25 l2), ``max_eps``
    (0.5 linf, the image diagonal l2). Cost per sample: about (2 + search_steps) PGD runs, each stopped at its
    first fooling iterate. Shapes: x [B, C, H, W] in [0, 1], y [B] -> (best [B, C, H, W], found [B]).
    """

    name, backend = "pgd-bisect", "native"
    Params = BisectParams
    inherits, inherited_params = "pgd", ("steps", "restarts", "losses", "random_start")

    def minimize(self, target: Target, x: torch.Tensor, y: torch.Tensor,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, max_eps = _limits(self.params, self.norm, x)
        min_eps = start * _MIN_FACTOR
        b = x.shape[0]
        dev = x.device
        best, found = x.clone(), torch.zeros(b, dtype=torch.bool, device=dev)
        hi = torch.full((b,), math.inf, dtype=torch.float64, device=dev)
        lo = torch.zeros(b, dtype=torch.float64, device=dev)
        with torch.no_grad():
            clean_wrong = target.logits(x).argmax(1) != y
        eps = torch.full((b,), float(start), dtype=torch.float64, device=dev)
        # bracket: double what survives (until max_eps), halve what is fooled (until min_eps)
        searching = ~clean_wrong
        while searching.any():
            index = searching.nonzero().squeeze(1)
            fooled = self._probe(target, x, y, index, eps, best, found, hi)
            survived = index[~fooled]
            lo[survived] = eps[survived]
            eps[index] = torch.where(fooled, torch.minimum(eps[index], hi[index]) / 2, eps[index] * 2)
            searching = ~clean_wrong & ((torch.isinf(hi) & (eps <= max_eps)) | (found & (lo == 0) & (eps >= min_eps)))
        # bisection inside [lo, hi]
        for _ in range(self.params.search_steps):
            open_ = found & (hi > lo * (1 + 1e-6))
            if not open_.any():
                break
            index = open_.nonzero().squeeze(1)
            mid = torch.where(lo[index] > 0, (lo[index] * hi[index]).sqrt(), hi[index] / 2)
            eps[index] = mid
            fooled = self._probe(target, x, y, index, eps, best, found, hi)
            survived = index[~fooled]
            lo[survived] = eps[survived]
        return best, found

    def _probe(self, target: Target, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, eps: torch.Tensor,
               best: torch.Tensor, found: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """PGD on the samples ``index`` at their budgets ``eps[index]``; records every fooling example smaller than
        the sample's best so far (``best``, ``found``, ``hi`` in place). Returns bool [len(index)]: fooled."""
        p = self.params
        fooled = torch.zeros(index.numel(), dtype=torch.bool, device=x.device)
        for _ in range(p.restarts):
            for loss_name in p.losses:
                todo = (~fooled).nonzero().squeeze(1)
                if todo.numel() == 0:
                    return fooled
                hit = self._one_run(target, x, y, index[todo], eps, LOSSES[loss_name], best, found, hi)
                fooled[todo[hit]] = True
        return fooled

    def _one_run(self, target: Target, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, eps: torch.Tensor,
                 loss_fn: Any, best: torch.Tensor, found: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """One PGD run from a (random) start; each sample stops at its first iterate that fools the deployed
        forward. Returns bool [len(index)]: fooled."""
        steps, ball = self.params.steps, norm_for(self.norm)
        xs, ys = x.index_select(0, index), y.index_select(0, index)
        radius = eps.index_select(0, index).to(x.dtype)
        alpha = 2.5 * radius / steps
        adv = start_point(xs, radius, self.norm) if self.params.random_start else xs.clone()
        alive = torch.arange(index.numel(), device=x.device)
        fooled = torch.zeros(index.numel(), dtype=torch.bool, device=x.device)
        for step in range(steps + 1):
            adv = adv.detach().requires_grad_(step < steps)
            with torch.set_grad_enabled(step < steps):
                logits = target.forward(adv).logits(target.head)
            deployed = logits.detach() if target.deployed_logits else target.logits(adv.detach())
            hit = deployed.argmax(1) != ys[alive]
            if hit.any():
                rows = alive[hit]
                self._keep(x, adv.detach()[hit], index[rows], best, found, hi)
                fooled[rows] = True
            if step == steps or bool(hit.all()):
                break
            grad, = torch.autograd.grad(loss_fn(logits, ys[alive]).sum(), adv, allow_unused=True)
            keep = ~hit
            with torch.no_grad():
                a = adv.detach()[keep]
                g = torch.zeros_like(a) if grad is None else grad[keep]
                alive = alive[keep]
                r = radius[alive]
                adv = project(a + per_sample(alpha[alive], a) * ball.ascent(g), xs[alive], r, self.norm)
        return fooled

    def _keep(self, x: torch.Tensor, adv: torch.Tensor, rows: torch.Tensor, best: torch.Tensor,
              found: torch.Tensor, hi: torch.Tensor) -> None:
        norms = sample_norms(adv.double() - x.index_select(0, rows).double(), self.norm)
        smaller = norms < hi.index_select(0, rows)
        if smaller.any():
            take = rows[smaller]
            best[take] = adv[smaller].to(best.dtype)
            hi[take] = norms[smaller]
            found[take] = True
