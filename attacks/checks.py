"""Checks on an evaluation: budgets (RobustBench style), the per-sample norm, and the gradient-masking probe.

Budgets: every adversarial example must lie in its eps ball and in [0, 1].

A violation is an error, never a record: an evaluation that let one through would report a robust accuracy for
a threat model it did not respect. Tolerances absorb float32 rounding only (each norm's ``atol`` / ``rtol``,
:mod:`robustness.core.norms`): ``linf <= eps + 1e-6`` and ``l2 <= eps * (1 + 1e-5) + 1e-6``; the image range is
checked exactly (and NaNs are violations).

:func:`zero_gradient_share`: the fraction of samples whose input gradient is exactly zero (a masking signal).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from models.network import CoarseFineNet
from models.protocol import adapt
from robustness.core.errors import BudgetViolation
from robustness.core.norms import NORM_NAMES, norm_for


def sample_norms(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample ``linf`` or ``l2`` norm of ``delta`` [B, ...] -> [B] (float64; computed on ``delta`` as given:
    pass a float64 difference for the records' norms, the attack's own float32 difference where it compares)."""
    return norm_for(norm).distance(delta)


def budget_limit(eps: float, norm: str) -> float:
    """The largest norm accepted for budget ``eps`` (eps plus the rounding tolerance)."""
    return norm_for(norm).limit(eps)


def check_budget(clean: torch.Tensor, adv: torch.Tensor, eps: float, norm: str, *, attack: str = "?",
                 backend: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    """Raise :class:`BudgetViolation` unless every ``adv`` is within ``eps`` of ``clean`` in ``norm`` and in [0, 1].

    Returns the per-sample ``(linf, l2)`` norms (so callers need not compute them twice).
    """
    where = f"attack {attack!r} (backend {backend}) at eps={eps:.6g} ({norm})"
    if adv.shape != clean.shape:
        raise BudgetViolation(f"{where} returned shape {list(adv.shape)} for inputs of shape {list(clean.shape)}")
    flat = adv.detach().flatten(1)
    bad_value = torch.isnan(flat).any(1)
    if bad_value.any():
        raise BudgetViolation(f"{where} returned NaN pixels in {int(bad_value.sum())} of {len(adv)} samples")
    low, high = flat.amin(1) if flat.shape[1] else None, flat.amax(1) if flat.shape[1] else None
    if low is not None:
        out_of_range = (low < 0) | (high > 1)
        if out_of_range.any():
            raise BudgetViolation(f"{where} left [0, 1] in {int(out_of_range.sum())} of {len(adv)} samples "
                                  f"(min {float(low.min()):.6g}, max {float(high.max()):.6g})")
    delta = adv.detach().double() - clean.detach().double()
    distances = {name: norm_for(name).distance(delta) for name in NORM_NAMES}  # the records keep every norm's
    norms = distances[norm_for(norm).name]
    over = norms > budget_limit(eps, norm)
    if over.any():
        raise BudgetViolation(f"{where} exceeded its budget in {int(over.sum())} of {len(adv)} samples "
                              f"(worst {norm} norm {float(norms.max()):.6g} > {eps:.6g})")
    return distances["linf"], distances["l2"]


def zero_gradient_share(model: CoarseFineNet | torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                        gate_mode: str = "hard", gate_grad: str = "none", head: str = "fine",
                        eot_samples: int = 8) -> float:
    """Fraction of samples whose input gradient of the CE loss (of ``head``) is exactly zero everywhere.

    A large share means gradient-based attacks cannot move those inputs: robustness there is likely masked.
    ``model`` may be any ``nn.Module`` (:func:`models.protocol.adapt`).
    """
    model = adapt(model)
    model.eval()
    xr = x.detach().clone().requires_grad_(True)
    with model.gating(mode=gate_mode, gate_grad=gate_grad, eot_samples=eot_samples):
        out = model(xr)
    loss = F.cross_entropy(out.logits(head).float(), y, reduction="sum")
    if not loss.requires_grad:
        return 1.0
    grad, = torch.autograd.grad(loss, xr, allow_unused=True)
    if grad is None:
        return 1.0
    return float((grad.flatten(1) == 0).all(1).float().mean())
