"""``routing-gradient``: the hard-gate ``none`` evaluation against each routing gradient, paired per sample, in
both directions.

Both directions are reported because both mean something: a routing gradient *weaker* than ``none`` is a poor
surrogate, not evidence that ``none`` is honest. The per-sample worst case over routing gradients (the report's
worst case) stays the number to trust either way.

Pitfall: only fixed-budget iterative attacks enter the routing comparison (a minimal attack such as CW does not
converge to a comparable budget, and its differences are noise of the search).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from attacks.base import ITERATIVE
from models.routing import ROUTING_GRADIENTS
from robustness.core.vocab import format_eps
from robustness.sanity._common import MAX_DETAILS, _attack_rows, _count, _criterion, _of_kind, _pair, _Pair, _pts
from robustness.sanity._registry import Check, CheckInputs, register_check

NAME = "routing-gradient"


@dataclass(frozen=True)
class _RoutingSetting:
    label: str
    acc: dict[str, float]
    worst: float
    pairs: dict[str, _Pair]
    stronger: tuple[str, ...]
    weaker: tuple[str, ...]

    @property
    def lowest_acc(self) -> float:
        return min(self.acc.values())

    @property
    def lowest(self) -> str:
        """The gradient of the lowest robust accuracy; ``none/bpda (tied)`` when several share it."""
        tied = [g for g, a in self.acc.items() if a == self.lowest_acc]
        return tied[0] if len(tied) == 1 else f"{'/'.join(tied)} (tied)"

    def describe(self, g: str) -> str:
        p = self.pairs[g]
        return f"none {_pts(p.acc_x)} vs {g} {_pts(p.acc_y)} ({p.counts('none', g)})"

    def line(self) -> str:
        found = [f"{g} stronger than none: {self.describe(g)}" for g in self.stronger] + \
                [f"{g} weaker than none: {self.describe(g)}" for g in self.weaker]
        return (f"{self.label}: {'; '.join(found)}; lowest {self.lowest} {_pts(self.lowest_acc)}, per-sample "
                f"worst case {_pts(self.worst)}")


def _routing_settings(df: pd.DataFrame, alpha: float, min_samples: int, min_points: float) -> list[_RoutingSetting]:
    rows = _attack_rows(df)
    rows = rows[(rows["eps"] > 0) & np.isfinite(rows["eps"])]
    rows = rows[_of_kind(rows, ITERATIVE) & rows["gate_grad"].isin(["none", *ROUTING_GRADIENTS]).to_numpy(bool)]
    keys = ["run", "attack", "backend", "norm", "eps", "gate_mode", "target"]
    out = []
    for (run, attack, backend, norm, eps, gate_mode, target), sub in rows.groupby(keys, observed=True, dropna=False):
        table = sub.groupby(["sample", "gate_grad"], observed=True)["robust"].min().unstack("gate_grad")
        grads = [g for g in ROUTING_GRADIENTS if g in table.columns]
        if "none" not in table.columns or not grads:
            continue
        pairs = {g: p for g in grads if (p := _pair(table["none"], table[g])) is not None}
        if not pairs:
            continue
        used = table[["none", *pairs]].astype(float)
        out.append(_RoutingSetting(
            label=f"{attack} at eps={format_eps(eps, str(norm))} on {run} ({backend}, {norm}, {gate_mode}, {target})",
            acc={g: float(used[g].mean()) for g in used.columns},  # NaN (sample not run) is skipped
            worst=float(used.min(axis=1).mean()),
            pairs=pairs,
            stronger=tuple(g for g, p in pairs.items() if p.y_stronger(alpha, min_samples, min_points)),
            weaker=tuple(g for g, p in pairs.items() if p.x_stronger(alpha, min_samples, min_points))))
    return out


def _names(grads: Iterable[str]) -> str:
    grads = list(dict.fromkeys(grads))
    return f"routing gradient{'s' if len(grads) > 1 else ''} {'/'.join(grads)} {'are' if len(grads) > 1 else 'is'}"


def check_routing_gradients(df: pd.DataFrame, alpha: float = 0.05, min_samples: int = 3,
                            min_points: float = 0.02) -> Check:
    """The hard-gate ``none`` evaluation against each routing gradient (:data:`ROUTING_GRADIENTS`), paired per
    sample, in both directions.

    Settings: white-box rows of fixed-budget iterative attacks (kind ``iterative``; minimal attacks such as CW do
    not converge to a comparable budget) at a finite eps > 0, one per (run, attack, backend, norm, eps, gate_mode,
    target) in which ``none`` and a routing gradient ran. For ``none`` vs gradient ``g`` on their common samples,
    ``b`` counts samples robust under ``none`` but not under ``g``, ``c`` the reverse (exact two-sided McNemar p).
    A difference counts only if p < ``alpha``, ``|b - c| >= min_samples`` and the accuracy gap is at least
    ``min_points``.

    ``warn`` when some ``g`` is significantly *stronger* than ``none`` (the hard-gate evaluation alone is masked)
    or significantly *weaker* (a poor surrogate: its numbers alone would be too optimistic); the evidence says
    which, with accuracies, b, c and p. ``pass`` when neither. Either way it names the gradient of the lowest robust
    accuracy and points to the per-sample worst case over routing gradients (the report's worst case) as the
    number to trust.
    """
    name = NAME
    settings = _routing_settings(df, alpha, min_samples, min_points)
    if not settings:
        return Check(name, "skip", f"Needs an iterative attack run with gate_grad 'none' and with a routing gradient "
                     f"({'/'.join(ROUTING_GRADIENTS)}) at the same eps.")
    n = _count(len(settings), "setting")
    if len(settings) == 1:
        s = settings[0]
        lowest = f"{s.lowest} gave the lowest robust accuracy ({_pts(s.lowest_acc)})"
        worst = f"the per-sample worst case over routing gradients ({_pts(s.worst)}; the report's worst case)"
    else:
        tally = pd.Series([s.lowest for s in settings]).value_counts(sort=True)
        lowest = "the lowest robust accuracy came from " + ", ".join(f"{g} in {_count(int(k), 'setting')}"
                                                                        for g, k in tally.items())
        w = [s.worst for s in settings]
        worst = (f"the per-sample worst case over routing gradients ({_pts(min(w))} to {_pts(max(w))} across "
                 f"settings; the report's worst case)")
    tail = f"{lowest}; {worst} is the number to trust"
    stronger = [s for s in settings if s.stronger]
    weaker = [s for s in settings if s.weaker]
    if not stronger and not weaker:
        grads = "/".join(dict.fromkeys(g for s in settings for g in s.pairs))
        return Check(name, "pass", f"No routing gradient ({grads}) differs significantly from 'none' "
                     f"({_criterion(alpha, min_samples, min_points)}) in {n} checked; {tail}.")
    parts = []
    if stronger:
        s = stronger[0]
        parts.append(f"{_names(g for t in stronger for g in t.stronger)} significantly stronger than 'none' in "
                     f"{len(stronger)} of {n}, so the hard-gate ('none') evaluation alone is masked there (e.g. "
                     f"{s.label}: {s.describe(s.stronger[0])})")
    if weaker:
        s = weaker[0]
        parts.append(f"{_names(g for t in weaker for g in t.weaker)} significantly weaker than 'none' in "
                     f"{len(weaker)} of {n}: a poor surrogate gradient, whose numbers alone would be too optimistic "
                     f"(e.g. {s.label}: {s.describe(s.weaker[0])})")
    text = "; ".join([*parts, tail])
    details = tuple(s.line() for s in settings if s.stronger or s.weaker)[:MAX_DETAILS]
    return Check(name, "warn", text[0].upper() + text[1:] + ".", details)


@register_check(NAME, order=50)
def _run(inputs: CheckInputs) -> Check:
    return check_routing_gradients(inputs.df, inputs.alpha, inputs.min_samples, inputs.min_points)
