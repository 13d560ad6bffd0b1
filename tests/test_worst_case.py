"""The per-sample worst case (attacks.records.worst_case): every attack's rows at a budget, and every
minimal-distance success whose distance fits under it."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_analysis import make_records

from attacks.records import worst_case

EPS = 17.5 / 255


def _fixed(n: int = 4, **kw) -> pd.DataFrame:
    return make_records(n, attack="pgd", backend="native", eps=EPS, **kw)


def _minimal(distance, success=True, **kw) -> pd.DataFrame:
    df = make_records(len(distance), attack="fmn", backend="native", eps=np.inf, success=success, **kw)
    return df.assign(linf=np.asarray(distance, float))


def _robust_at(worst: pd.DataFrame, eps: float = EPS, gate_mode: str = "hard") -> dict[int, bool]:
    at = worst[np.isclose(worst["eps"].to_numpy(float), eps) & (worst["gate_mode"] == gate_mode)]
    return dict(zip(at["sample"].astype(int), at["robust"].astype(bool)))


def test_a_minimal_success_within_the_budget_breaks_the_sample_there():
    distance = [EPS - 1e-4, EPS, EPS + 1e-4, EPS / 2]
    worst = worst_case(pd.concat([_fixed(), _minimal(distance)], ignore_index=True))
    assert _robust_at(worst) == {0: False, 1: False, 2: True, 3: False}  # norm <= eps, as within_budgets scores
    broken = worst[np.isclose(worst["eps"], EPS) & ~worst["robust"]]
    assert set(broken["found_by"]) == {"fmn"} and (broken["linf"] <= EPS).all()
    # the eps = inf rows stay what they were: the minimal distances
    assert _robust_at(worst, np.inf) == {0: False, 1: False, 2: False, 3: False}


def test_a_fixed_budget_example_comes_before_the_minimal_one():
    fixed = _fixed(success=[True, False, False, False])
    worst = worst_case(pd.concat([fixed, _minimal([EPS / 2] * 4)], ignore_index=True))
    at = worst[np.isclose(worst["eps"], EPS)].set_index("sample")
    assert at.loc[0, "found_by"] == "pgd" and at.loc[1, "found_by"] == "fmn"


@pytest.mark.parametrize("other", [
    {"gate_mode": "open"},           # another view of the model
    {"norm": "l2"},                  # another threat model: an L2 distance says nothing about an L-inf budget
    {"model": "dual"},
    {"success": False},              # the minimal attack found nothing
    {"clean_correct": False},        # misclassified clean: not robust anyway, by its fixed-budget row
])
def test_only_a_success_of_the_same_model_view_and_norm_counts(other):
    minimal = _minimal([EPS / 2] * 4, **{"success": True, **other})
    fixed = _fixed(**({"clean_correct": False} if "clean_correct" in other else {}))
    robust = _robust_at(worst_case(pd.concat([fixed, minimal], ignore_index=True)))
    assert robust == {s: "clean_correct" not in other for s in range(4)}


def test_a_transfer_evaluation_keeps_its_own_worst_case():
    transfer = _fixed(source_run="dual")
    worst = worst_case(pd.concat([transfer, _minimal([EPS / 2] * 4)], ignore_index=True))
    at = worst[np.isclose(worst["eps"], EPS)]
    assert (at["source_run"] == "dual").all() and at["robust"].all()


def test_a_non_finite_minimal_example_does_not_count():
    minimal = _minimal([EPS / 2] * 4).assign(nonfinite=[True, False, False, False])
    # its eps = inf row is non-robust (non-finite logits), but it is no example inside the budget
    robust = _robust_at(worst_case(pd.concat([_fixed(), minimal], ignore_index=True)))
    assert robust == {0: True, 1: False, 2: False, 3: False}


def test_grouping_without_eps_takes_the_records_as_they_are():
    df = pd.concat([_fixed(), _minimal([EPS / 2] * 4)], ignore_index=True)
    worst = worst_case(df, by=["run", "model", "norm", "gate_mode", "target", "source_run"])
    assert len(worst) == 4 and not worst["robust"].any()


def test_the_accuracy_table_and_the_headline_name_the_minimal_attacks_whose_examples_count_at_a_budget():
    """A worst case below every fixed-eps attack's own number must say where the extra breaks came from."""
    from reports.tables import worst_case_table
    from robustness.analysis.metrics import worst_case_accuracy
    df = pd.concat([_fixed(), _minimal([EPS / 2, EPS * 2, EPS * 2, EPS * 2])], ignore_index=True)
    table = worst_case_accuracy(df)
    at_eps = table[np.isclose(table["eps"].to_numpy(float), EPS)].iloc[0]
    assert at_eps["attacks"] == "pgd" and at_eps["within_budget"] == "fmn" and at_eps["robust_acc"] == 0.75
    assert table[np.isinf(table["eps"].to_numpy(float))].iloc[0]["within_budget"] == ""
    shown = worst_case_table(table)
    assert shown.loc[np.isclose(table["eps"].to_numpy(float), EPS), "Attacks pooled"].tolist() == [
        "pgd + fmn (within eps)"]
    # no minimal example fits under the budget: nothing is named
    far = worst_case_accuracy(pd.concat([_fixed(), _minimal([EPS * 2] * 4)], ignore_index=True))
    assert far[np.isclose(far["eps"].to_numpy(float), EPS)].iloc[0]["within_budget"] == ""
