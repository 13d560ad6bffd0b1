"""Compact views of one run for the top of its report: where the headline numbers come from, the attack x eps
pivot of robust accuracy, and what the compute attacks do to the MACs a skipping model saves.

All three look at one *scope* (:func:`headline_scope`): the white-box rows of the deployed gate mode (``hard``
for a gated model, an ungated model's only mode) on one head. Pitfalls they guard against:

- Compute attacks (kind ``compute``, e.g. ``slowdown``) try to raise MACs, not to flip predictions; their
  ``robust`` column is not a robust accuracy. :func:`accuracy_pivot` drops them (``accuracy_rows``) and
  :func:`compute_attack_table` keeps only them. ``path`` is kind iterative and counts for accuracy.
- eps = 0 (that is clean accuracy) and eps = inf (a minimal-norm attack's smallest example, see
  :mod:`robustness.analysis.distances`) are no columns of the pivot.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from attacks.base import COMPUTE, attacks_of_kind
from attacks.records import worst_case
from robustness.analysis.selection import accuracy_rows, deployed_mode, strongest_per_sample, whitebox
from robustness.analysis.stats import put_interval, wilson_interval
from robustness.core.vocab import HEADS

#: The pivot row of the per-sample worst case over every accuracy attack.
WORST_ROW = "worst case"
PIVOT_COLUMNS: list[str] = ["attack", "norm", "eps", "n", "robust_acc", "robust_acc_low", "robust_acc_high"]
COMPUTE_COLUMNS: list[str] = ["attack", "norm", "eps", "n", "clean_macs", "adv_macs", "full_macs", "taken_back"]


def headline_scope(records: pd.DataFrame) -> dict[str, str] | None:
    """The gate mode and head a run's headline describes: the deployed mode (:func:`deployed_mode`) and the first
    head of :data:`HEADS` its white-box rows attack (else the most attacked head); None without white-box rows."""
    wb = whitebox(records)
    mode = deployed_mode(wb)
    if mode is None:
        return None
    targets = wb.loc[wb["gate_mode"].astype(str) == mode, "target"].astype(str)
    target = next((h for h in HEADS if (targets == h).any()), None) or str(targets.value_counts().index[0])
    return {"gate_mode": mode, "target": target}


def scoped(records: pd.DataFrame, scope: dict[str, str] | None) -> pd.DataFrame:
    """The white-box rows of ``scope`` (empty when ``scope`` is None)."""
    wb = whitebox(records)
    if scope is None:
        return wb.iloc[:0]
    mask = np.ones(len(wb), dtype=bool)
    for k, v in scope.items():
        mask &= (wb[k].astype(str) == v).to_numpy(bool)
    return wb[mask]


def _fixed_budget(df: pd.DataFrame) -> pd.DataFrame:
    eps = df["eps"].to_numpy(float)
    return df[np.isfinite(eps) & (eps > 0)]


def _accuracy_groups(df: pd.DataFrame, attack: str | None, confidence: float) -> list[dict]:
    rows = []
    for (name, norm, eps), g in df.groupby(["attack", "norm", "eps"], sort=True, observed=True):
        row = {"attack": attack or str(name), "norm": str(norm), "eps": float(eps), "n": len(g)}
        put_interval(row, "robust_acc", wilson_interval(int(g["robust"].sum()), len(g), confidence))
        rows.append(row)
    return rows


def accuracy_pivot(records: pd.DataFrame, scope: dict[str, str] | None = None,
                   confidence: float = 0.95, worst: pd.DataFrame | None = None) -> pd.DataFrame:
    """Robust accuracy per accuracy attack and fixed budget (norm, finite eps > 0) in ``scope`` (default
    :func:`headline_scope`), each attack at its best backend and routing gradient per sample
    (:func:`strongest_per_sample`), plus the :data:`WORST_ROW` over all of them; tidy, :data:`PIVOT_COLUMNS`,
    Wilson intervals. ``worst``: the records' ``metrics.worst_case_accuracy`` (at ``confidence``) when the caller
    has it (:class:`robustness.findings.run.RunAnalysis`); its rows in ``scope`` are the :data:`WORST_ROW`."""
    scope = headline_scope(records) if scope is None else scope
    rows = _fixed_budget(accuracy_rows(scoped(records, scope)))
    if rows.empty:
        return pd.DataFrame(columns=PIVOT_COLUMNS)
    out = _accuracy_groups(strongest_per_sample(rows), None, confidence)
    out += (_accuracy_groups(worst_case(rows), WORST_ROW, confidence) if worst is None else
            _worst_groups(_fixed_budget(scoped(worst, scope))))
    return pd.DataFrame(out, columns=PIVOT_COLUMNS)


def _worst_groups(worst: pd.DataFrame) -> list[dict]:
    """The :data:`WORST_ROW` rows from a ``worst_case_accuracy`` table of one run and scope (per norm and eps)."""
    return [{"attack": WORST_ROW, "norm": str(r["norm"]), "eps": float(r["eps"]), "n": int(r["n"]),
             "robust_acc": r["robust_acc"], "robust_acc_low": r["robust_acc_low"],
             "robust_acc_high": r["robust_acc_high"]}
            for _, r in worst.sort_values(["norm", "eps"], kind="stable").iterrows()]


def compute_attack_table(records: pd.DataFrame, full_macs: float | None,
                         scope: dict[str, str] | None = None) -> pd.DataFrame:
    """Per compute attack (``attacks_of_kind(COMPUTE)``) and fixed budget in ``scope``'s gate mode: mean MACs on the
    clean and on the attacked inputs, the all-blocks ``full_macs``, and ``taken_back`` = mean(adv - clean) /
    (full - mean clean), the share of the saved compute the attack takes back (NaN when nothing was saved or
    ``full_macs`` is unknown).

    A sample's attacked MACs are the most over backends and routing gradients (the compute analogue of the
    per-sample worst case). Any head: compute does not depend on the head attacked.
    """
    scope = headline_scope(records) if scope is None else scope
    mode_only = {"gate_mode": scope["gate_mode"]} if scope else None
    rows = _fixed_budget(scoped(records, mode_only))
    rows = rows[rows["attack"].astype(str).isin(attacks_of_kind(COMPUTE))]
    if rows.empty:
        return pd.DataFrame(columns=COMPUTE_COLUMNS)
    full = float(full_macs) if full_macs else float("nan")
    per_sample = rows.groupby(["attack", "norm", "eps", "sample"], sort=True, observed=True).agg(
        clean=("clean_macs", "mean"), adv=("adv_macs", "max"))
    out = []
    for (attack, norm, eps), g in per_sample.groupby(level=["attack", "norm", "eps"], sort=True):
        clean, adv = float(g["clean"].mean()), float(g["adv"].mean())
        saved = full - clean
        out.append({"attack": str(attack), "norm": str(norm), "eps": float(eps), "n": len(g), "clean_macs": clean,
                    "adv_macs": adv, "full_macs": full,
                    "taken_back": (adv - clean) / saved if np.isfinite(saved) and saved > 0 else float("nan")})
    return pd.DataFrame(out, columns=COMPUTE_COLUMNS)
