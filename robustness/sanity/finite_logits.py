"""``finite-logits``: the model's logits are finite on clean and on adversarial inputs.

Non-finite logits (the records' ``nonfinite`` column, :mod:`attacks.records`): such rows are never robust, so an
all-NaN model would pass the masking checks with flat curves at 0%. ``finite-logits`` fails on non-finite clean
logits and warns on non-finite adversarial ones, and when more than half of the rows (:data:`NONFINITE_DOMINANT`)
are non-finite every other check is skipped and says why (:func:`robustness.sanity.run_checks` puts
:func:`_skipped` in their place): the records then describe a forward that does not compute, not an attack.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from attacks.records import NONFINITE_PRED
from robustness.core.vocab import format_eps
from robustness.sanity._common import MAX_DETAILS, _count, _pts
from robustness.sanity._registry import Check, CheckInputs, register_check

#: share of non-finite rows above which the other checks are skipped (:func:`robustness.sanity.run_checks`)
NONFINITE_DOMINANT = 0.5
FINITE_CHECK = "finite-logits"


def _head_column(df: pd.DataFrame, side: str) -> np.ndarray:
    """Per row: the ``side`` (``clean`` / ``adv``) prediction of the row's attacked head."""
    fine = df[f"{side}_pred_fine"].to_numpy(np.int64)
    coarse = df[f"{side}_pred_coarse"].to_numpy(np.int64)
    return np.where(df["target"].astype(str).to_numpy(object) == "coarse", coarse, fine)


def nonfinite_share(df: pd.DataFrame) -> float:
    """Share of rows whose logits were non-finite (0 for an empty frame or records without the column)."""
    if not len(df) or "nonfinite" not in df.columns:
        return 0.0
    return float(df["nonfinite"].to_numpy(bool).mean())


def check_finite_logits(df: pd.DataFrame) -> Check:
    """The model's logits are finite on clean and on adversarial inputs (the records' ``nonfinite`` column).

    ``fail`` when any clean logit of the attacked head is non-finite (NaN or inf; ``clean_pred_<target>`` is
    :data:`attacks.records.NONFINITE_PRED`): those samples are counted wrong, and every accuracy of the run measures
    a forward that does not compute. ``warn`` when only adversarial logits are non-finite: those rows count as not
    robust and not as successful attacks, and the robust accuracy reflects inputs on which the model breaks down
    numerically, not adversarial examples. ``pass`` otherwise; ``skip`` without records."""
    name = FINITE_CHECK
    if not len(df):
        return Check(name, "skip", "No records to check.")
    bad = df["nonfinite"].to_numpy(bool) if "nonfinite" in df.columns else np.zeros(len(df), bool)
    clean_bad = bad & (_head_column(df, "clean") == NONFINITE_PRED)
    adv_bad = bad & ~clean_bad
    samples = df[["run", "sample"]].drop_duplicates()
    if not bad.any():
        return Check(name, "pass", f"Every clean and adversarial logit is finite ({_count(len(df), 'row')} of "
                     f"{_count(len(samples), 'sample')} checked).")
    keys = ["run", "attack", "backend", "norm", "gate_mode", "gate_grad", "target", "eps"]
    per = (df.assign(n_clean_bad=clean_bad, n_adv_bad=adv_bad).groupby(keys, observed=True, dropna=False)
           [["n_clean_bad", "n_adv_bad"]].sum().reset_index())
    per = per[(per["n_clean_bad"] > 0) | (per["n_adv_bad"] > 0)]
    per = per.sort_values(["n_adv_bad", "n_clean_bad"], ascending=False, kind="stable")
    details = tuple(f"{r.attack}/{r.backend}/{r.gate_grad} ({r.gate_mode}, {r.target}) at eps={format_eps(r.eps, r.norm)} on "
                    f"{r.run}: {int(r.n_clean_bad)} clean, {int(r.n_adv_bad)} adversarial"
                    for r in per.itertuples())[:MAX_DETAILS]
    adv_rows = int(adv_bad.sum())
    adv_samples = len(df.loc[adv_bad, ["run", "sample"]].drop_duplicates())
    if clean_bad.any():
        broken = len(df.loc[clean_bad, ["run", "sample"]].drop_duplicates())
        runs = sorted(df.loc[clean_bad, "run"].astype(str).unique())
        more = (f"; adversarial logits are non-finite in {adv_rows} more rows ({_count(adv_samples, 'sample')})"
                if adv_rows else "")
        return Check(name, "fail", f"The clean logits are non-finite (NaN or inf) for {broken} of "
                     f"{_count(len(samples), 'sample')} (in {', '.join(map(repr, runs))}){more}: those samples count as wrong "
                     f"and never robust, so the clean and robust accuracies measure a forward that does not compute, "
                     f"not robustness; fix the model before reading any number.", details)
    top = per.iloc[0]
    attacked = _count(int((df["eps"] > 0).sum()), "attacked row")
    return Check(name, "warn", f"The clean logits are finite, but the adversarial logits are non-finite (NaN or inf) "
                 f"in {adv_rows} of {attacked} ({adv_samples} of {_count(len(samples), 'sample')}; most in "
                 f"{top.attack}/{top.gate_grad} at eps={format_eps(top.eps, top.norm)}: {int(top.n_adv_bad)}): those rows count "
                 f"as not robust and not as successful attacks; the model breaks down numerically inside the budget, "
                 f"so its robust accuracy there reflects that, not adversarial examples.", details)


def _skipped(check: Check, share: float) -> Check:
    """``check`` replaced by a skip saying that non-finite rows dominate the records."""
    return Check(check.name, "skip", f"Not checked: {_pts(share)} of the rows have non-finite logits (more than "
                 f"{_pts(NONFINITE_DOMINANT)}; see {FINITE_CHECK}), so these records describe a forward that does not "
                 f"compute, not an attack.")


@register_check(FINITE_CHECK, order=90, masking=False)
def _run(inputs: CheckInputs) -> Check:
    return check_finite_logits(inputs.df)
