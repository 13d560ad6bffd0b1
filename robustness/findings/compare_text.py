"""The verdict line's text: each pair's clause (eps-free or fixed-eps), what the evidence is, and when the
comparison cannot tell.

:func:`robustness.findings.compare.compare_runs` and :func:`robustness.findings.seeds.compare_seeds` join these
into the one line ``dsn-robust run`` ends with.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from robustness.analysis.distances import DistanceComparison
from robustness.analysis.selection import whitebox
from robustness.findings.variant import Variant
from robustness.analysis.verdict import PairVerdict
from models.routing import ROUTING_GRADIENTS
from robustness.core.norms import title_of
from robustness.core.vocab import format_distance, format_eps

def _distance_clause(p: DistanceComparison, v: PairVerdict) -> str:
    fmt = lambda x: format_distance(x, p.norm)  # noqa: E731
    ratio = (f"{v.evidence}; medians {fmt(p.median_a.estimate)} vs {fmt(p.median_b.estimate)}"
             if p.n_both_correct else "no distance ratio (no sample is classified correctly by both)")
    return (f"{p.a} vs {p.b}: {ratio}; curves differ most at eps={fmt(p.eps_at)}: "
            f"{100 * p.acc_a_at:.1f}% vs {100 * p.acc_b_at:.1f}% ({100 * p.diff_at.estimate:+.1f} points "
            f"[{100 * p.diff_at.low:+.1f}, {100 * p.diff_at.high:+.1f}]), mean gap over eps <= {fmt(p.cap)} "
            f"{100 * p.gap.estimate:+.1f} points [{100 * p.gap.low:+.1f}, {100 * p.gap.high:+.1f}]; "
            f"clean {100 * p.clean_a.estimate:.1f}% vs {100 * p.clean_b.estimate:.1f}%")


def _fixed_clause(p: Mapping[str, Any], v: PairVerdict) -> str:
    return (f"{p['a']} vs {p['b']}: {v.evidence}; robust acc {100 * p['acc_a']:.1f}% vs {100 * p['acc_b']:.1f}% "
            f"at eps={format_eps(p['eps'], p['norm'])} (where they differ most, of {p['candidates']} unsaturated eps); "
            f"clean {100 * p['clean_a']:.1f}% vs {100 * p['clean_b']:.1f}%")


def routing_grads(skip: Variant) -> list[str]:
    return sorted(set(whitebox(skip.records)["gate_grad"].astype(str)) & set(ROUTING_GRADIENTS))


def distance_what(norm: str, grads: Sequence[str]) -> str:
    return (f"minimal {title_of(norm, plain=True)} distance per sample, minimum over attacks and routing "
            f"gradients (none{'/' + '/'.join(grads) if grads else ''})")


def _cannot_tell(skip: Variant | None, statics: Sequence[Variant]) -> str | None:
    if skip is None:
        return "Cannot tell: no variant skips layers (a gated model in a mode other than open)."
    if not statics:
        return f"Cannot tell: no static (non-skipping) variant to compare {skip.label} against."
    return None


def _fixed_what(skip: Variant) -> str:
    grads = routing_grads(skip)
    return f"worst-case (incl. {'/'.join(grads)})" if grads else "worst-case"
