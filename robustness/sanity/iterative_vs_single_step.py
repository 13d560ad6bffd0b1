"""``iterative-vs-single-step``: iterative attacks (kind ``iterative``: PGD, APGD, ...) are at least as strong as
single-step ones (kind ``single-step``: FGSM) at each eps, beyond noise (``max(1 sample, tol)``, ``tol`` = 1
point). An iterative attack that ran in the attack cascade after the single-step one holds its finds, so it cannot
be weaker: such settings are left out (``cascade = false`` compares them)."""
from __future__ import annotations

import pandas as pd

from attacks.base import ITERATIVE, SINGLE_STEP
from robustness.core.vocab import format_eps
from robustness.sanity._common import _accuracy, _attack_rows, _of_kind, _pts, _tolerance, _verdict
from robustness.sanity._registry import Check, CheckInputs, register_check

NAME = "iterative-vs-single-step"


def _single_step_names(rows: pd.DataFrame) -> list[str]:
    return sorted(set(rows.loc[_of_kind(rows, SINGLE_STEP), "attack"].astype(str)))


def check_iterative_vs_single_step(df: pd.DataFrame, tol: float = 0.01) -> Check:
    """Iterative attacks (PGD, APGD, ...) are at least as strong as single-step ones (FGSM) at each eps."""
    name = NAME
    rows = _attack_rows(df)
    rows = rows[rows["eps"] > 0]
    keys = ["run", "norm", "eps", "gate_mode", "gate_grad", "target"]
    iterative = _of_kind(rows, ITERATIVE)
    it = _accuracy(rows[iterative], keys + ["attack"]) if iterative.any() else None
    ss = _accuracy(rows[_of_kind(rows, SINGLE_STEP)], keys + ["attack"])
    if it is None or ss.empty:
        return Check(name, "skip", "Needs both a single-step (fgsm) and an iterative (pgd/apgd) attack.")
    # an iterative attack that ran in the cascade after the single-step one holds its finds: it cannot be weaker
    after = rows[iterative & rows["found_by"].astype(str).isin(_single_step_names(rows)).to_numpy(bool)]
    if not after.empty:
        cascaded = after[keys].drop_duplicates()
        it = it.merge(cascaded, on=keys, how="left", indicator=True)
        it = it[it["_merge"] == "left_only"].drop(columns="_merge")
    cascaded = Check(name, "skip", "The iterative attacks ran in the attack cascade after the single-step one (each "
                     "only on the samples it left robust), so they cannot be weaker; cascade = false compares them.")
    if it.empty:
        return cascaded
    it_best = it.loc[it.groupby(keys, observed=True, dropna=False)["acc"].idxmin()]
    ss_best = ss.loc[ss.groupby(keys, observed=True, dropna=False)["acc"].idxmin()]
    both = it_best.merge(ss_best, on=keys, suffixes=("_it", "_ss"))
    if both.empty:
        return cascaded if not after.empty else Check(name, "skip", "No eps at which both a single-step and an "
                                                      "iterative attack were run.")
    violations = [
        f"{r.attack_it} {_pts(r.acc_it)} vs {r.attack_ss} {_pts(r.acc_ss)} at eps={format_eps(r.eps, r.norm)} "
        f"({r.run}, {r.gate_grad})"
        for r in both.itertuples()
        if r.acc_it > r.acc_ss + _tolerance(int(min(r.n_it, r.n_ss)), tol)]
    return _verdict(name, violations, len(both), "setting", "the iterative attack is weaker than FGSM",
                    "The best iterative attack is at least as strong as FGSM at every eps")


@register_check(NAME, order=20)
def _run(inputs: CheckInputs) -> Check:
    return check_iterative_vs_single_step(inputs.df, inputs.tol)
