"""``transfer-vs-whitebox``: examples transferred from another run do not succeed more often than the white-box
attack on the same target at the same eps (beyond noise: ``max(1 sample, tol)``)."""
from __future__ import annotations

import pandas as pd

from robustness.analysis.transfer import transfer_matrix
from robustness.core.vocab import format_eps
from robustness.sanity._common import MAX_DETAILS, _count, _pts, _tolerance
from robustness.sanity._registry import Check, CheckInputs, register_check

NAME = "transfer-vs-whitebox"


def check_transfer_vs_whitebox(df: pd.DataFrame, tol: float = 0.01) -> Check:
    """Transferred examples do not succeed more often than white-box ones on the same target at the same eps."""
    name = NAME
    if df.empty or (df["source_run"].fillna("") == "").all():
        return Check(name, "skip", "No transfer records (source_run != '').")
    tm = transfer_matrix(df)
    keys = ["run", "attack", "norm", "eps", "gate_mode", "target"]
    tr, wb = tm[~tm["whitebox"]], tm[tm["whitebox"]]
    both = tr.merge(wb[keys + ["success_rate", "n_clean_correct"]], on=keys, suffixes=("_tr", "_wb"))
    if both.empty:
        return Check(name, "skip", "No white-box run of the transferred attack on the target at the same eps.")
    violations = [f"{r.attack} {r.source_run}->{r.run} at eps={format_eps(r.eps, r.norm)}: "
                  f"transfer {_pts(r.success_rate_tr)} vs white-box {_pts(r.success_rate_wb)}"
                  for r in both.itertuples()
                  if r.success_rate_tr > r.success_rate_wb + _tolerance(int(r.n_clean_correct_wb), tol)]
    if violations:
        return Check(name, "warn", f"Transfer beats white-box in {len(violations)} of "
                     f"{_count(len(both), 'setting')} "
                     f"(e.g. {violations[0]}): the white-box attack is not finding the target's real weak spots.",
                     tuple(violations[:MAX_DETAILS]))
    return Check(name, "pass", f"Transfer never beats the white-box attack ({_count(len(both), 'setting')} checked).")


@register_check(NAME, order=70)
def _run(inputs: CheckInputs) -> Check:
    return check_transfer_vs_whitebox(inputs.df, inputs.tol)
