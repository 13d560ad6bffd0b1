"""Gradient-masking checks over attack records.

Which attacks a check compares comes from each attack's registered kind (``attacks.base``): single-step,
iterative, gradient-free, minimal or compute. Compute attacks (``slowdown``) do not count for accuracy; a name the
registry does not know (an older run, a synthetic frame) belongs to no kind and counts for accuracy.

Each check returns a :class:`Check`: ``pass`` when the records look like an honest evaluation, ``warn`` when they
show a symptom of gradient masking (or of a broken attack), ``fail`` when the records cannot be trusted at all (the
model's clean logits are non-finite: ``finite-logits``), ``skip`` when the records lack what the check needs.
The evidence is one sentence with the numbers. :func:`worst_status` orders them fail > warn > pass > skip.

Non-finite logits are never robust, so when more than half of the rows (:data:`NONFINITE_DOMINANT`) are
non-finite every masking check is skipped and says why (:mod:`~robustness.sanity.finite_logits`).

Robust accuracy is always the mean of the ``robust`` column (clean and adversarial prediction right), never of
``adv_correct``: a sample the model gets wrong on clean input and an attack happens to push to the right class is
not robust, and counting it lets two evaluations differ on samples that no attack needed to break.

Noise: curves of one attack (eps-monotone, iterative-vs-single-step) allow ``max(1 sample, tol)`` (``tol`` = 1
point). Comparisons between two evaluations of the same samples (routing gradients, Square vs gradient attacks)
are *paired*: per sample, ``b`` = robust under the first only, ``c`` = robust under the second only, and a
difference counts only if the exact McNemar test gives p < ``alpha`` (0.05), ``|b - c| >= min_samples`` (3) and
the accuracy gap is at least ``min_points`` (2 points; Square uses ``margin``, 3 points). A fixed margin alone
is not enough: on 64 samples 3 points are 2 samples, which noise produces all the time.

One module per check; each registers itself on import (:func:`register_check`, :mod:`~robustness.sanity._registry`)
and this package imports them all. :func:`run_checks` runs them in this order (``order``; the masking checks
first, then the two that are not replaced by skips):

====  ==============================  =======================================================
  10  ``eps-monotone``                :mod:`~robustness.sanity.eps_monotone`
  20  ``iterative-vs-single-step``    :mod:`~robustness.sanity.iterative_vs_single_step`
  30  ``unbounded-attack``            :mod:`~robustness.sanity.unbounded`
  40  ``square-vs-gradient``          :mod:`~robustness.sanity.square_vs_gradient`
  50  ``routing-gradient``            :mod:`~robustness.sanity.routing_gradients`
  60  ``zero-input-gradient``         :mod:`~robustness.sanity.zero_gradients`
  70  ``transfer-vs-whitebox``        :mod:`~robustness.sanity.transfer_vs_whitebox`
  80  ``curve-vs-fixed-eps``          :mod:`~robustness.sanity.curve_vs_fixed`
  90  ``finite-logits``               :mod:`~robustness.sanity.finite_logits` (never skipped)
 100  ``Coarse-head analyses``        :mod:`~robustness.sanity.heads` (only without a coarse head)
====  ==============================  =======================================================

A plug-in check is a runner ``(CheckInputs) -> Check | None`` decorated with ``@register_check(name, order=...)``
(without an order it runs after these); :func:`unregister_check` removes it. Helpers several checks share (number
formatting, row selection, the paired comparison) live in :mod:`~robustness.sanity._common`.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import pandas as pd

from robustness.sanity._common import MAX_DETAILS
from robustness.sanity._registry import (
    DEFAULT_ORDER,
    SEVERITY,
    Check,
    CheckInputs,
    RegisteredCheck,
    Status,
    register_check,
    registered_checks,
    unregister_check,
)

# importing the check modules registers their checks
from robustness.sanity.eps_monotone import check_eps_monotone
from robustness.sanity.iterative_vs_single_step import check_iterative_vs_single_step
from robustness.sanity.unbounded import check_unbounded
from robustness.sanity.square_vs_gradient import check_square_vs_gradient
from robustness.sanity.routing_gradients import check_routing_gradients
from robustness.sanity.zero_gradients import check_zero_gradients
from robustness.sanity.transfer_vs_whitebox import check_transfer_vs_whitebox
from robustness.sanity.curve_vs_fixed import check_curve_vs_fixed
from robustness.sanity.finite_logits import (
    FINITE_CHECK,
    NONFINITE_DOMINANT,
    _skipped,
    check_finite_logits,
    nonfinite_share,
)
from robustness.sanity.heads import check_heads

__all__ = [
    "Check", "CheckInputs", "RegisteredCheck", "Status", "SEVERITY", "MAX_DETAILS", "NONFINITE_DOMINANT",
    "FINITE_CHECK", "DEFAULT_ORDER", "register_check", "unregister_check", "registered_checks", "run_checks",
    "worst_status", "nonfinite_share", "check_eps_monotone", "check_iterative_vs_single_step", "check_unbounded",
    "check_square_vs_gradient", "check_routing_gradients", "check_zero_gradients", "check_transfer_vs_whitebox",
    "check_curve_vs_fixed", "check_finite_logits", "check_heads",
]


def run_checks(df: pd.DataFrame, *, zero_grad_share: float | pd.Series | Mapping[str, float] | None = None,
               tol: float = 0.01, margin: float = 0.03, unbounded_threshold: float = 0.05, alpha: float = 0.05,
               min_samples: int = 3, min_points: float = 0.02,
               queries: Mapping[str, int] | None = None, minimal: pd.DataFrame | None = None) -> list[Check]:
    """All checks on ``df``, in a fixed order. ``margin`` is the Square check's gap and power margin; ``alpha``,
    ``min_samples`` and ``min_points`` decide when a paired difference counts; ``queries`` is the gradient-free
    attack's query budget per run name (from the attack manifest); ``minimal`` is ``df``'s minimal distances
    when the caller has them (:mod:`robustness.findings.run`), so they are not computed twice. Records without a coarse head get one more
    (``skip``) entry saying which analyses were skipped (:func:`check_heads`). The finite-logits check
    (:func:`check_finite_logits`) comes after the masking checks; when more than :data:`NONFINITE_DOMINANT` of the
    rows are non-finite, the masking checks are replaced by skips that say so.

    The checks are the registered ones (:func:`registered_checks`, in the order of the package docstring's
    table), plug-ins included."""
    inputs = CheckInputs(df, zero_grad_share=zero_grad_share, tol=tol, margin=margin,
                         unbounded_threshold=unbounded_threshold, alpha=alpha, min_samples=min_samples,
                         min_points=min_points, queries=queries, minimal=minimal)
    share = nonfinite_share(df)
    checks = []
    for entry in registered_checks():
        check = entry.run(inputs)
        if check is not None:
            checks.append(_skipped(check, share) if entry.masking and share > NONFINITE_DOMINANT else check)
    return checks


def worst_status(checks: Iterable[Check]) -> Status:
    """The worst status of ``checks`` in the order fail > warn > pass > skip (``skip`` when there is none)."""
    statuses = {c.status for c in checks}
    return next((s for s in SEVERITY if s in statuses and s != "skip"), "skip")  # type: ignore[return-value]
