"""Which records an analysis looks at: white-box rows, rows of attacks that count for accuracy, rows matching a
setting, the per-sample strongest attack, and the attack family a one-run report shows.

Whether an attack counts for accuracy is not decided here: its kind in the attack registry decides
(``attacks.records.accuracy_rows``, from ``attacks.base.counts_for_accuracy``; a name the registry does not
know, e.g. from an older run, counts).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from attacks.records import accuracy_mask, accuracy_rows, worst_case

#: Keys of the attack family a one-run report's figures show (see :func:`primary_evaluation`).
FAMILY_KEYS: list[str] = ["run", "attack", "backend", "norm", "gate_mode", "gate_grad", "target"]


def whitebox(df: pd.DataFrame) -> pd.DataFrame:
    """The white-box rows (``source_run == ''``)."""
    return df[df["source_run"].fillna("") == ""]


def select(df: pd.DataFrame, where: Mapping[str, object]) -> pd.DataFrame:
    """Rows of ``df`` whose columns equal every value in ``where``."""
    mask = np.ones(len(df), dtype=bool)
    for k, v in where.items():
        mask &= (df[k] == v).fillna(False).to_numpy(bool)
    return df[mask]


def strongest_per_sample(df: pd.DataFrame) -> pd.DataFrame:
    """Records collapsed to one row per (run, model, attack, norm, eps, gate_mode, target, source_run, sample):
    the per-sample worst case over backends and routing gradients (``backend='any'``, ``gate_grad='any'``)."""
    if df.empty:
        return df.copy()
    parts = []
    for attack, sub in df.groupby("attack", sort=True, observed=True):
        w = worst_case(sub)
        w["attack"] = attack
        parts.append(w)
    return pd.concat(parts, ignore_index=True)


def primary_evaluation(df: pd.DataFrame) -> dict[str, str] | None:
    """The white-box attack family (:data:`FAMILY_KEYS`) the per-run figures show: attacks that count for accuracy
    first (compute attacks only when there is nothing else), then the most eps values, then the lowest mean robust
    accuracy over eps > 0; None when no white-box attack ran at eps > 0."""
    wb = whitebox(df)
    wb = wb[wb["eps"] > 0]
    if wb.empty:
        return None
    scores = wb.assign(other=~accuracy_mask(wb)).groupby(FAMILY_KEYS, observed=True).agg(
        other=("other", "first"), n_eps=("eps", "nunique"), acc=("robust", "mean"))
    best = scores.sort_values(["other", "n_eps", "acc"], ascending=[True, False, True]).index[0]
    return {k: str(v) for k, v in zip(FAMILY_KEYS, best)}
