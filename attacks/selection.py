"""Per-sample choice among candidate adversarial batches, decided by the deterministic forward.

A library's own success flag is never consulted: a candidate counts only if the recomputed prediction of the
attacked head (``Target.logits``, no grad, in the evaluation's gate mode) differs from the label.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch
from torch.nn import functional as F

from attacks.checks import sample_norms

if TYPE_CHECKING:
    from attacks.base import Target


def select_worst(target: "Target", candidates: Sequence[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    """Per sample, the first candidate that the deterministic forward misclassifies; else the highest-CE one."""
    best, best_wrong, best_loss = None, None, None
    for cand in candidates:
        logits = target.logits(cand)
        wrong = logits.argmax(1) != y
        loss = F.cross_entropy(logits.float(), y, reduction="none")
        if best is None:
            best, best_wrong, best_loss = cand.clone(), wrong, loss
            continue
        better = (wrong & ~best_wrong) | ((wrong == best_wrong) & ~best_wrong & (loss > best_loss))
        best[better] = cand[better]
        best_wrong = best_wrong | wrong
        best_loss = torch.where(better, loss, best_loss)
    return best


def keep_smallest_adversarial(target: "Target", x: torch.Tensor, y: torch.Tensor,
                              candidates: Sequence[torch.Tensor], norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Among ``candidates`` keep per sample the smallest-norm one the deterministic forward misclassifies.

    Returns ``(best, found)``: ``best`` is the clean image where nothing was found.
    """
    best = x.clone()
    best_norm = torch.full((x.shape[0],), math.inf, dtype=torch.float64, device=x.device)
    found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for cand in candidates:
        wrong = target.logits(cand).argmax(1) != y
        norms = sample_norms(cand - x, norm)
        better = wrong & (norms < best_norm)
        best[better] = cand[better]
        best_norm = torch.where(better, norms, best_norm)
        found |= better
    return best, found


def within_budgets(x: torch.Tensor, best: torch.Tensor, found: torch.Tensor, eps: Sequence[float],
                   norm: str) -> list[torch.Tensor]:
    """For a minimal-perturbation attack: at each budget the found example if its norm fits, else the clean one."""
    norms = sample_norms(best - x, norm)
    out = []
    for e in eps:
        ok = (found & (norms <= float(e))).view(-1, *([1] * (x.dim() - 1)))
        out.append(torch.where(ok, best, x))
    return out
