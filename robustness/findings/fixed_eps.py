"""The comparison's fixed-eps fallback, for runs without minimal-attack records: one eps, chosen where the pair
differs most, tested honestly (:func:`_fixed_eps_pair`: its interval re-selects the eps in every resample, its exact
McNemar test is Bonferroni-corrected for the choice, never at an eps where both variants are saturated), and the
effect and test the verdict rule judges (:func:`_fixed_eps_effect`). Used by
:func:`robustness.findings.compare.compare_runs`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from robustness.analysis.stats import PAIR_KEYS, bootstrap_many, mcnemar_test
from robustness.findings.variant import Variant
from robustness.analysis.verdict import Effect, PairedTest
from robustness.core.norms import NORM_NAMES
from robustness.core.vocab import format_eps


def _fixed_eps_pair(a: Variant, b: Variant, ca: pd.DataFrame, cb: pd.DataFrame, n_boot: int,
                    seed: int) -> dict[str, Any] | None:
    """The fallback's pair: the worst-case rows (fine head, linf first) at finite eps > 0 where the two variants
    are not both saturated (both at 0%, or both at their clean accuracy: the attack fooled nothing), the eps with
    the largest absolute robust-accuracy difference. Its bootstrap interval re-selects the eps in every resample
    (on the samples every candidate eps shares); its exact McNemar test on the paired robust flags is
    Bonferroni-corrected for the number of candidate eps. None when every eps is saturated."""
    on = [*PAIR_KEYS, "sample"]
    cols = [*on, "robust", "clean_correct"]
    wa, wb = ca[ca["attack"] == "worst"], cb[cb["attack"] == "worst"]
    j = wa[cols].merge(wb[cols], on=on, suffixes=("_a", "_b"))
    eps = j["eps"].to_numpy(float)
    j = j[(eps > 0) & np.isfinite(eps)]
    if j.empty:
        return None
    if (j["target"] == "fine").any():
        j = j[j["target"] == "fine"]
    first = NORM_NAMES[0]  # the default threat model (linf) when the rows have it
    norm = first if (j["norm"] == first).any() else str(j["norm"].iloc[0])
    j = j[j["norm"] == norm].astype({"robust_a": bool, "robust_b": bool, "clean_correct_a": bool,
                                    "clean_correct_b": bool})
    per = j.groupby(PAIR_KEYS, sort=True, observed=True).agg(
        acc_a=("robust_a", "mean"), acc_b=("robust_b", "mean"), clean_a=("clean_correct_a", "mean"),
        clean_b=("clean_correct_b", "mean"), n=("sample", "size")).reset_index()
    saturated = (((per["acc_a"] == 0) & (per["acc_b"] == 0))
                 | (np.isclose(per["acc_a"], per["clean_a"]) & np.isclose(per["acc_b"], per["clean_b"])))
    per = per[~saturated].reset_index(drop=True)
    if per.empty:
        return None
    diff = (per["acc_a"] - per["acc_b"]).to_numpy(float)
    k = int(np.argmax(np.abs(diff)))
    row = per.iloc[k]
    at = j[(j["attack"] == row["attack"]) & (j["eps"] == row["eps"]) & (j["target"] == row["target"])]
    ya, yb = at["robust_a"].to_numpy(bool), at["robust_b"].to_numpy(bool)
    # the interval: per resample of the shared samples, the difference at the eps where that resample differs most
    keyed = j.assign(d=j["robust_a"].astype(float) - j["robust_b"].astype(float))
    cand = per[PAIR_KEYS].merge(keyed, on=PAIR_KEYS)
    matrix = cand.pivot_table(index="sample", columns=PAIR_KEYS, values="d", aggfunc="first").dropna()
    if len(matrix):
        columns = [matrix[c].to_numpy(float) for c in matrix.columns]

        def picked(*rows: np.ndarray) -> np.ndarray:
            means = np.stack([r.mean(axis=1) for r in rows], axis=1)
            return means[np.arange(len(means)), np.argmax(np.abs(means), axis=1)][:, None]

        iv = bootstrap_many(picked, columns, n_boot, seed)[0]
        low, high = iv.low, iv.high
    else:
        low = high = float("nan")
    p, sign, b_only, c_only = mcnemar_test(ya, yb)
    return {"a": a.label, "b": b.label, "attack": row["attack"], "norm": row["norm"], "eps": float(row["eps"]),
            "target": row["target"], "n": int(row["n"]), "acc_a": float(row["acc_a"]), "acc_b": float(row["acc_b"]),
            "diff": float(diff[k]), "diff_low": float(low), "diff_high": float(high),
            "mcnemar_p": min(1.0, p * len(per)), "mcnemar_p_uncorrected": p, "candidates": int(len(per)),
            "sign": sign, "robust_only_a": b_only, "robust_only_b": c_only,
            "clean_a": float(row["clean_a"]), "clean_b": float(row["clean_b"]),
            "n_both_correct": int((at["clean_correct_a"].to_numpy(bool) & at["clean_correct_b"].to_numpy(bool)).sum())}


def _fixed_eps_effect(p: Mapping[str, Any], what: str) -> tuple[Effect, PairedTest]:
    effect = Effect(f"{what} robust accuracy difference at eps={format_eps(p['eps'], p['norm'])}", p["diff"],
                    p["diff_low"], p["diff_high"], "difference")
    corrected = f", Bonferroni over {p['candidates']} eps" if p["candidates"] > 1 else ""
    test = PairedTest("exact McNemar", p["mcnemar_p"], p["sign"], p["n"], "paired samples",
                      f"{p['robust_only_a']} vs {p['robust_only_b']} discordant{corrected}")
    return effect, test
