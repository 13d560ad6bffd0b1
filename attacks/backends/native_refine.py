"""A short bisection below each sample's best known adversarial distance (backend ``native``, attack ``pgd-refine``).

The minimal-norm attacks (FMN, DDN, CW) optimise a surrogate of "smallest fooling perturbation" and can stop short
of the minimum; the fixed-budget attacks answer only "is there an example within eps?". Both leave, per sample, an
*upper bound* on its minimal distance: the smallest norm at which anything the run evaluated fooled it
(``Target.upper_bound``, handed over by the runner after every other attack has run). The distance that matters
is the smallest one the strongest search finds (Carlini et al., "On evaluating adversarial robustness", 2019,
sec. 5: report the minimal distance curve), so a few probes of the suite's PGD *strictly below* that bound look
for a smaller one:

* the search interval of a sample with bound ``u`` is ``(lo, hi) = (0, u)``;
* each probe runs the per-sample PGD of ``pgd-bisect`` (:class:`attacks.backends.native_bisect.PGDBisect`) at the
  midpoint: ``hi / 2`` while ``lo = 0`` (so the first probe is at ``u / 2``), the geometric one ``sqrt(lo * hi)``
  after; a probe that fools sets ``hi`` to the norm of the fooling example found, one that does not sets ``lo``
  to its eps;
* ``search_steps`` probes (4). Once a probe has failed, ``hi / lo <= 2``, and every later probe takes the square
  root of that ratio.

A sample's result is the smallest fooling example of all its probes, whose norm is below ``u`` by construction
(an example is kept only when its norm is below the sample's ``hi``, which starts at ``u``); where no probe
fools, or no finite bound was given, the clean image is returned with found = False: the earlier attack's
example stays the sample's best, and nothing is claimed here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from attacks.backends.native_bisect import PGDBisect
from attacks.backends.native_pgd import NativePGDParams
from attacks.base import Target, register
from attacks.params import positive_int

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefineParams(NativePGDParams):
    """PGD's parameters (per probe; ``alpha`` must stay ``None``: the step follows each probe's eps) plus
    ``search_steps`` (4 probes below the known bound)."""

    restarts: int = 1
    search_steps: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        positive_int(self, "search_steps")
        if self.alpha is not None:
            raise ValueError("alpha must be unset (None): each probe steps 2.5 * eps / steps at its own eps")
        if self.max_steps is not None or self.stall_tol is not None:
            raise ValueError("max_steps and stall_tol are the fixed-budget PGD's: each probe runs exactly steps")


@register
class PGDRefine(PGDBisect):
    """Smaller minimal distances by a short PGD bisection strictly below each sample's best known distance.

    Minimal-norm attacks such as FMN stop short, and a fixed-eps PGD success says only that the distance is at
    most that eps: together they give each sample an upper bound ``u`` (``Target.upper_bound``, float64 [B]). A
    few bisection probes inside (0, u) with the run's PGD find smaller distances (Carlini et al. 2019, "On
    evaluating adversarial robustness": report the minimal distance curve of the strongest search). The first
    probe is at ``u / 2``; a fooled probe sets ``hi`` to the found example's norm, a failed one ``lo`` to its eps;
    the next probe is at the midpoint, geometric once ``lo > 0`` (as in ``pgd-bisect``).

    Norm ``linf`` or ``l2``. Parameters (:class:`RefineParams`; ``steps``, ``restarts``, ``losses`` and
    ``random_start`` default to the run's PGD): ``steps`` (50), ``restarts`` (1 per loss), ``losses`` (``ce``,
    ``margin``), ``random_start`` (True), ``search_steps`` (4). Cost per sample with a finite bound that is
    clean-correct: ``search_steps`` PGD probes (each up to ``restarts * len(losses)`` runs, stopped at the first
    fooling iterate); every other sample costs nothing. Shapes: x [B, C, H, W] in [0, 1], y [B] -> (best
    [B, C, H, W], found [B]): ``best`` has norm < u where found, the clean image where not (no bound: ``upper_bound``
    None or inf; misclassified clean; nothing found below u).
    """

    name, backend = "pgd-refine", "native"
    Params = RefineParams
    inherits, inherited_params = "pgd", ("steps", "restarts", "losses", "random_start")
    refines: ClassVar[bool] = True

    def minimize(self, target: Target, x: torch.Tensor, y: torch.Tensor,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        dev = x.device
        best, found = x.clone(), torch.zeros(b, dtype=torch.bool, device=dev)
        if target.upper_bound is None:
            log.debug("pgd-refine: no upper bounds given, nothing to refine")
            return best, found
        bound = torch.as_tensor(target.upper_bound).detach().to(device=dev, dtype=torch.float64).reshape(-1)
        if bound.numel() != b:
            raise ValueError(f"pgd-refine: upper_bound has {bound.numel()} values for a batch of {b}")
        with torch.no_grad():
            clean_right = target.logits(x).argmax(1) == y
        active = clean_right & torch.isfinite(bound) & (bound > 0)
        # hi starts at the bound: _keep records an example only when its norm is below the sample's hi
        hi = torch.where(active, bound, torch.full_like(bound, float("inf")))
        lo = torch.zeros(b, dtype=torch.float64, device=dev)
        eps = torch.zeros(b, dtype=torch.float64, device=dev)
        for _ in range(self.params.search_steps):
            open_ = active & (hi > lo * (1 + 1e-6))
            if not open_.any():
                break
            index = open_.nonzero().squeeze(1)
            eps[index] = torch.where(lo[index] > 0, (lo[index] * hi[index]).sqrt(), hi[index] / 2)
            fooled = self._probe(target, x, y, index, eps, best, found, hi)
            survived = index[~fooled]
            lo[survived] = eps[survived]
        return best, found
