"""Adding a metric is one registered function: it appears in every summary and in the report's summary files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from robustness.analysis import SUMMARY_COLUMNS, Evaluation, register_metric, summarize, unregister_metric


def _records(n: int = 8) -> pd.DataFrame:
    from attacks.records import conform
    rng = np.random.default_rng(0)
    clean_correct = rng.random(n) < 0.8
    adv_correct = clean_correct & (rng.random(n) < 0.5)
    return conform(pd.DataFrame({
        "run": "r", "model": "dsn", "attack": "pgd", "backend": "torchattacks", "norm": "linf", "eps": 0.01,
        "gate_mode": "hard", "gate_grad": "none", "target": "fine", "source_run": "", "sample": np.arange(n),
        "seed": 0, "label_fine": 0, "label_coarse": 0, "clean_pred_fine": np.where(clean_correct, 0, 1),
        "clean_pred_coarse": 0, "adv_pred_fine": np.where(adv_correct, 0, 1), "adv_pred_coarse": 0,
        "clean_correct": clean_correct, "adv_correct": adv_correct, "success": clean_correct & ~adv_correct,
        "linf": 0.01, "l2": 0.1, "clean_path": "10", "adv_path": np.where(rng.random(n) < 0.5, "11", "10"),
        "hamming": 0, "clean_macs": 1.0, "adv_macs": 1.0, "frozen_pred_fine": 0, "frozen_pred_coarse": 0,
        "frozen_correct": True,
    }))


@pytest.fixture
def robust_among_changed():
    columns = {"robust_among_changed": "robust share of the samples whose path changed"}

    @register_metric(columns)
    def robust_among_changed(ev: Evaluation) -> dict[str, float]:
        changed = ev.hamming > 0
        return {"robust_among_changed": float(ev.records["adv_correct"].to_numpy(bool)[changed].mean())
                if changed.any() else float("nan")}

    try:
        yield robust_among_changed
    finally:
        unregister_metric(robust_among_changed, list(columns))
    assert "robust_among_changed" not in SUMMARY_COLUMNS


def test_a_registered_metric_is_a_summary_column(robust_among_changed):
    df = _records()
    row = summarize(df, n_boot=0).iloc[0]
    changed = (df["adv_path"] != df["clean_path"]).to_numpy()
    assert row["robust_among_changed"] == pytest.approx(df["adv_correct"].to_numpy(bool)[changed].mean())
    assert "robust_among_changed" in SUMMARY_COLUMNS
    # the built-in columns are still there, in their order, before the new one
    assert list(row.index).index("robust_acc") < list(row.index).index("robust_among_changed")


def test_a_metric_may_not_take_an_existing_column():
    with pytest.raises(ValueError, match="robust_acc already exist"):
        register_metric({"robust_acc": "again"})(lambda ev: {})
