"""``eps-monotone``: robust accuracy does not rise with eps along any attack's curve (beyond noise: ``max(1
sample, tol)``, ``tol`` = 1 point)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from robustness.core.vocab import format_eps
from robustness.sanity._common import _accuracy, _points, _pts, _tolerance, _verdict
from robustness.sanity._registry import Check, CheckInputs, register_check

NAME = "eps-monotone"


def check_eps_monotone(df: pd.DataFrame, tol: float = 0.01) -> Check:
    """Robust accuracy does not rise with eps (beyond noise) along any attack's curve."""
    name = NAME
    curve_keys = ["run", "attack", "backend", "norm", "gate_mode", "gate_grad", "target", "source_run"]
    acc = _accuracy(df, curve_keys + ["eps"]) if len(df) else pd.DataFrame()
    violations, total = [], 0
    for key, g in (acc.groupby(curve_keys, observed=True, dropna=False) if len(acc) else []):
        g = g.sort_values("eps")
        if len(g) < 2:
            continue
        total += 1
        best, best_eps = np.inf, None
        for eps, a, n in zip(g["eps"], g["acc"], g["n"]):
            if best_eps is not None and a > best + _tolerance(int(n), tol):
                violations.append(f"{key[1]}/{key[2]}/{key[5]} on {key[0]}: {_pts(a)} at eps={format_eps(eps, key[3])} "
                                  f"vs {_pts(best)} at eps={format_eps(best_eps, key[3])}")
                break
            if a < best:
                best, best_eps = a, eps
    if total == 0:
        return Check(name, "skip", "No attack was run at two or more eps values.")
    return _verdict(name, violations, total, "curve", "robust accuracy rises with eps",
                    f"Robust accuracy never rises with eps by more than max(1 sample, {_points(tol)})")


@register_check(NAME, order=10)
def _run(inputs: CheckInputs) -> Check:
    return check_eps_monotone(inputs.df, inputs.tol)
