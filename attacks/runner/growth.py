"""Runs grow: budgets added to a finished run become evaluations of their own, beside the records already there.

A resume that asks an evaluation for budgets its records do not hold (``attack RUN --resume --eps ...``, ``run
--resume --set attack.eps=...``) would otherwise be refused: an evaluation's shards hold every budget of its
batch, so its budgets are part of its fingerprint. :func:`grown` plans instead, for each fixed-budget evaluation
asked for, the stored evaluations of that attack, routing gradient and head exactly as they were made (complete:
skipped; interrupted: resumed) and one more with only the new budgets, id ``<id>__eps-<digest>``. The old
records stay as they are, bit for bit; the new ones carry their own fingerprint, and the attack cascade links
evaluations only where their budgets meet (:func:`attacks.runner.cascade.link`). A new attack needs nothing
here: it is a new evaluation anyway. Minimal-norm attacks have no budgets to add (eps = inf).
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Sequence

from attacks.base import MINIMAL
from attacks.runner.cascade import link
from attacks.runner.plan import EvalPlan

GROWTH_MARK = "__eps-"


def _digest(eps: Sequence[float]) -> str:
    return hashlib.sha256(",".join(f"{float(e)!r}" for e in eps).encode()).hexdigest()[:8]


def grown(plans: Sequence[EvalPlan], previous: dict[str, Any] | None, cascade: bool = True) -> list[EvalPlan]:
    """``plans`` with each fixed-budget evaluation that has stored records split into those stored evaluations
    and one for the budgets they lack (module docstring); unchanged without a previous manifest."""
    stored = {str(e.get("id")): e for e in (previous or {}).get("evaluations", [])}
    if not stored:
        return list(plans)
    out: list[EvalPlan] = []
    for plan in plans:
        family = [e for i, e in stored.items() if i == plan.id or i.startswith(plan.id + GROWTH_MARK)]
        if not family or plan.attack.kind == MINIMAL:
            out.append(plan)
            continue
        covered: set[float] = set()
        for entry in family:
            eps = [float(e) for e in entry.get("eps", [])]
            covered |= set(eps)
            out.append(dataclasses.replace(plan, eps=eps, suffix=str(entry["id"])[len(plan.id):]))
        extra = [float(e) for e in plan.eps if float(e) not in covered]
        if extra:
            out.append(dataclasses.replace(plan, eps=extra, suffix=GROWTH_MARK + _digest(extra)))
    return link(out, cascade)
