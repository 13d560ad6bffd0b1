"""``curve-vs-fixed-eps``: the fixed-eps attacks' per-sample worst case lies inside the 95% band of the robustness
curve (from the minimal distances) at every budget."""
from __future__ import annotations

import numpy as np
import pandas as pd

from attacks.base import MINIMAL, attack_kind
from robustness.analysis.distances import DISTANCE_KEYS, minimal_distances
from robustness.analysis.stats import wilson_interval
from robustness.core.vocab import format_eps
from robustness.sanity._common import MAX_DETAILS, _attack_rows, _count, _pts
from robustness.sanity._registry import Check, CheckInputs, register_check

NAME = "curve-vs-fixed-eps"


def check_curve_vs_fixed(df: pd.DataFrame, minimal: pd.DataFrame | None = None) -> Check:
    """The fixed-eps attacks' per-sample worst case lies inside the robustness curve's 95% band at every budget.

    The curve (from the minimal distances) and the fixed-eps attacks are independent searches for the same
    thing. Fixed-eps robust accuracy above the band: the minimal search found examples within the budget that the
    fixed-eps attacks missed (the fixed-eps numbers overstate robustness). Below it: the minimal search stopped
    short there (its distances overstate robustness). ``minimal``: ``df``'s minimal distances, when computed
    already."""
    name = NAME
    dist = minimal_distances(df) if minimal is None else minimal
    rows = _attack_rows(df)
    fixed = rows[(rows["attack"].astype(str).map(lambda a: attack_kind(a) != MINIMAL).to_numpy(bool))
                 & np.isfinite(rows["eps"]) & (rows["eps"] > 0)]
    if dist.empty or fixed.empty:
        return Check(name, "skip", "Needs both minimal-distance records (eps=inf) and fixed-eps attacks.")
    keys = [k for k in DISTANCE_KEYS if k != "model"]
    robust = fixed.groupby([*keys, "eps", "sample"], observed=True)["robust"].all().reset_index()
    above, below, checked = [], [], 0
    for key, g in robust.groupby([*keys, "eps"], observed=True):
        d = dist[np.logical_and.reduce([dist[k] == v for k, v in zip(keys, key[:-1])])]
        d = d[d["sample"].isin(g["sample"])]
        if d.empty:
            continue
        eps, checked = float(key[-1]), checked + 1
        band = wilson_interval(int((d["distance"].to_numpy(float) > eps).sum()), len(d))
        acc = float(g["robust"].mean())
        where = (f"{key[0]} ({key[1]}, {key[3]}) eps={format_eps(eps, key[3])}: fixed-eps {_pts(acc)} vs curve "
                 f"{_pts(band.estimate)} [{_pts(band.low)}, {_pts(band.high)}]")
        if acc > band.high:
            above.append(where)
        elif acc < band.low:
            below.append(where)
    if not checked:
        return Check(name, "skip", "No budget where both the curve and a fixed-eps attack have the same samples.")
    if above or below:
        parts = ([f"{len(above)} above the curve's band (the fixed-eps attacks missed examples the minimal search "
                  f"found; e.g. {above[0]})"] if above else []) + \
                ([f"{len(below)} below it (the minimal search stopped short; e.g. {below[0]})"] if below else [])
        return Check(name, "warn", f"Of {_count(checked, 'budget')}, fixed-eps robust accuracy lies "
                     + " and ".join(parts) + ".", tuple((above + below)[:MAX_DETAILS]))
    return Check(name, "pass", f"At {_count(checked, 'budget')} the fixed-eps worst case lies inside the "
                 "robustness curve's 95% band.")


@register_check(NAME, order=80)
def _run(inputs: CheckInputs) -> Check:
    return check_curve_vs_fixed(inputs.df, inputs.minimal)
