"""``unbounded-attack``: an unbounded attack (eps = inf, or the largest linf eps when it is at least
``proxy_eps``, as a proxy) drives robust accuracy below ``threshold``; compute attacks do not count."""
from __future__ import annotations

import numpy as np
import pandas as pd

from robustness.core.norms import LINF
from robustness.core.vocab import format_eps
from robustness.sanity._common import _accuracy, _attack_rows, _pts, _verdict
from robustness.sanity._registry import Check, CheckInputs, register_check

NAME = "unbounded-attack"


def check_unbounded(df: pd.DataFrame, threshold: float = 0.05, proxy_eps: float = 0.3) -> Check:
    """An unbounded attack (eps = inf, or a linf eps >= ``proxy_eps`` as a proxy) drives accuracy below
    ``threshold``."""
    name = NAME
    rows = _attack_rows(df)
    unbounded = rows[np.isinf(rows["eps"])]
    how = "eps=inf"
    if unbounded.empty:
        linf = rows[(rows["norm"] == LINF.name) & np.isfinite(rows["eps"])]
        if linf.empty or linf["eps"].max() < proxy_eps:
            return Check(name, "skip", f"No unbounded attack (eps=inf) and no linf eps >= {proxy_eps} was run.")
        unbounded = linf[linf["eps"] == linf["eps"].max()]
        how = f"linf eps={format_eps(float(unbounded['eps'].iloc[0]))} (proxy for unbounded)"
    keys = ["run", "norm", "eps", "gate_mode", "target"]
    acc = _accuracy(unbounded, keys + ["attack", "backend", "gate_grad"])
    best = acc.loc[acc.groupby(keys, observed=True, dropna=False)["acc"].idxmin()]
    violations = [f"best attack {r.attack}/{r.gate_grad} leaves {_pts(r.acc)} accuracy on {r.run} ({r.gate_mode})"
                  for r in best.itertuples() if r.acc >= threshold]
    return _verdict(name, violations, len(best), "setting",
                    f"an unbounded attack ({how}) leaves accuracy >= {_pts(threshold)}",
                    f"An unbounded attack ({how}) drives accuracy below {_pts(threshold)}, worst "
                    f"{_pts(float(best['acc'].max()))}")


@register_check(NAME, order=30)
def _run(inputs: CheckInputs) -> Check:
    return check_unbounded(inputs.df, inputs.unbounded_threshold)
