"""Which records an analysis looks at: white-box rows, rows of attacks that count for accuracy, rows matching a
setting, the per-sample strongest attack, the deployed gate mode, and the attack family a one-run report shows.

Whether an attack counts for accuracy is not decided here: its kind in the attack registry decides
(``attacks.records.accuracy_rows``, from ``attacks.base.counts_for_accuracy``; a name the registry does not
know, e.g. from an older run, counts).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from attacks.base import MINIMAL, attack_kind
from attacks.records import accuracy_mask, accuracy_rows, worst_case

#: Keys of the attack family a one-run report's figures show (see :func:`primary_evaluation`).
FAMILY_KEYS: list[str] = ["run", "attack", "backend", "norm", "gate_mode", "gate_grad", "target"]

#: The gate mode a gated model is deployed with (every other mode is a diagnostic forward).
DEPLOYED_MODE = "hard"


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


def deployed_mode(df: pd.DataFrame) -> str | None:
    """The gate mode that stands for the model as deployed: :data:`DEPLOYED_MODE` when the records hold it, else
    the mode with the most rows (an ungated model has one); None for empty records."""
    if df.empty:
        return None
    modes = df["gate_mode"].astype(str)
    if (modes == DEPLOYED_MODE).any():
        return DEPLOYED_MODE
    counts = modes.value_counts()
    return str(sorted(counts.index[counts == counts.max()])[0])


def primary_evaluation(df: pd.DataFrame) -> dict[str, str] | None:
    """The white-box attack family (:data:`FAMILY_KEYS`) the per-run figures show, ranked by

    1. the deployed gate mode (:func:`deployed_mode`) first: an ``open`` forward executes every block, so its gate
       figures are all zeros — ranking across modes by strength picked it whenever it was the weakest model;
    2. attacks that count for accuracy (compute attacks only when there is nothing else);
    3. fixed-budget attacks before minimal-norm ones (whose examples at a budget are a by-product of the search);
    4. the run's main norm (the one with the most fixed-budget rows): an L2 DDN at its three budgets otherwise won
       over the L-inf threat model by being at 0% there;
    5. the most finite eps values > 0 (an unbounded minimal-norm row says nothing per eps);
    6. the lowest mean robust accuracy over those eps.

    None when no white-box attack ran at eps > 0.
    """
    wb = whitebox(df)
    wb = wb[wb["eps"] > 0]
    if wb.empty:
        return None
    finite = np.isfinite(wb["eps"].to_numpy(float))
    names = wb["attack"].astype(str)
    minimal = names.map({a: attack_kind(a) == MINIMAL for a in names.unique()}).to_numpy(bool)
    norms = wb.loc[~minimal, "norm"].astype(str)
    main_norm = norms.value_counts().index[0] if len(norms) else ""
    ranked = wb.assign(aside=(wb["gate_mode"].astype(str) != deployed_mode(wb)).to_numpy(), other=~accuracy_mask(wb),
                       minimal=minimal, off_norm=(wb["norm"].astype(str) != main_norm).to_numpy(),
                       eps_=wb["eps"].astype(float).where(finite), robust_=wb["robust"].astype(float).where(finite))
    scores = ranked.groupby(FAMILY_KEYS, observed=True).agg(
        aside=("aside", "first"), other=("other", "first"), minimal=("minimal", "first"),
        off_norm=("off_norm", "first"), n_eps=("eps_", "nunique"), acc=("robust_", "mean"))
    scores["acc"] = scores["acc"].fillna(np.inf)
    best = scores.sort_values(["aside", "other", "minimal", "off_norm", "n_eps", "acc"],
                              ascending=[True, True, True, True, False, True]).index[0]
    return {k: str(v) for k, v in zip(FAMILY_KEYS, best)}
