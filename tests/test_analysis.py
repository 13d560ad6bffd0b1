"""Analysis on constructed records with known answers (no models needed).

``make_records`` is also used by test_sanity.py and test_reports.py.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from attacks.records import conform
from robustness import analysis

N_FINE, PER_SUPER = 10, 5
FINE_TO_COARSE = [c // PER_SUPER for c in range(N_FINE)]
BASE_MACS, BLOCK_MACS = 2e6, 1e6


def _arr(x, n, dtype=None):
    return np.full(n, x, dtype=dtype) if np.ndim(x) == 0 else np.asarray(x, dtype=dtype)


def make_records(n: int = 100, *, run: str = "runA", model: str = "dsn", attack: str = "pgd",
                 backend: str = "torchattacks", norm: str = "linf", eps: float = 8 / 255, gate_mode: str = "hard",
                 gate_grad: str = "none", target: str = "fine", source_run: str = "", n_gates: int = 4,
                 clean_correct=True, adv_correct=None, success=None, clean_path=None, adv_path=None,
                 frozen_correct=None, adv_pred_fine=None, samples=None) -> pd.DataFrame:
    """Conformed records with a known structure.

    Give either ``adv_correct`` or ``success`` (default: every attack fails). Paths default to all-ones (clean and
    adversarial); MACs follow the paths (``BASE_MACS`` + ``BLOCK_MACS`` per executed block); ``n_gates=0`` makes
    an ungated model. Fine labels cycle over 10 classes, superclass = fine // 5.
    """
    samples = np.arange(n) if samples is None else np.asarray(samples)
    label_fine = samples % N_FINE
    label_coarse = label_fine // PER_SUPER
    cc = _arr(clean_correct, n, bool)
    if adv_correct is not None:
        ac = _arr(adv_correct, n, bool)
    else:
        ac = cc & ~_arr(False if success is None else success, n, bool)
    succ = cc & ~ac
    wrong = (label_fine + PER_SUPER) % N_FINE  # another superclass
    clean_pf = np.where(cc, label_fine, wrong)
    adv_pf = _arr(adv_pred_fine, n, np.int64) if adv_pred_fine is not None else np.where(ac, label_fine, wrong)
    f2c = np.asarray(FINE_TO_COARSE)
    cp = pd.Series(_arr("1" * n_gates if clean_path is None else clean_path, n, object), dtype="string")
    ap = pd.Series(_arr(cp.to_numpy(object) if adv_path is None else adv_path, n, object), dtype="string")
    ones = lambda s: s.str.count("1").to_numpy(float)  # noqa: E731
    df = pd.DataFrame({
        "run": run, "model": model, "attack": attack, "backend": backend, "norm": norm, "eps": eps,
        "gate_mode": gate_mode, "gate_grad": gate_grad, "target": target, "source_run": source_run,
        "sample": samples, "seed": 0, "label_fine": label_fine, "label_coarse": label_coarse,
        "clean_pred_fine": clean_pf, "clean_pred_coarse": f2c[clean_pf], "adv_pred_fine": adv_pf,
        "adv_pred_coarse": f2c[adv_pf], "clean_correct": cc, "adv_correct": ac, "success": succ,
        "linf": eps if np.isfinite(eps) else 1.0, "l2": 0.5, "clean_path": cp, "adv_path": ap,
        "hamming": [sum(a != b for a, b in zip(x, y)) for x, y in zip(cp, ap)],
        "clean_macs": BASE_MACS + BLOCK_MACS * ones(cp), "adv_macs": BASE_MACS + BLOCK_MACS * ones(ap),
        "frozen_pred_fine": adv_pf, "frozen_pred_coarse": f2c[adv_pf],
        "frozen_correct": ac if frozen_correct is None else _arr(frozen_correct, n, bool),
    })
    return conform(df)


def full_macs(n_gates: int = 4) -> float:
    return BASE_MACS + BLOCK_MACS * n_gates


# --------------------------------------------------------------------------------------------- distances, rates

@pytest.mark.parametrize("a,b,ham,jac", [("1100", "1010", 2, 2 / 3), ("0000", "0000", 0, 0.0),
                                         ("1111", "0000", 4, 1.0), ("0110", "0110", 0, 0.0),
                                         ("1000", "1001", 1, 0.5), ("", "", 0, 0.0)])
def test_hamming_and_jaccard_by_hand(a, b, ham, jac):
    assert analysis.hamming_distance(a, b) == ham
    assert analysis.jaccard_distance(a, b) == pytest.approx(jac)


def test_path_errors_are_clear():
    with pytest.raises(ValueError, match="differ in length"):
        analysis.path_matrix(pd.Series(["101", "10"]))
    with pytest.raises(ValueError, match="bit strings"):
        analysis.path_matrix(pd.Series(["1x1"]))


def test_flip_rates_by_hand():
    df = make_records(4, n_gates=2, clean_path=["10", "10", "01", "00"], adv_path=["11", "00", "01", "10"])
    rates = analysis.block_rates(df, path_names=["coarse.s2.b1", "fine.s2.b1"]).set_index("block")
    b0, b1 = rates.loc["coarse.s2.b1"], rates.loc["fine.s2.b1"]
    assert (b0.clean_rate, b0.adv_rate, b0.flip_01, b0.flip_10) == (0.5, 0.5, 0.25, 0.25)
    assert (b1.clean_rate, b1.adv_rate, b1.flip_01, b1.flip_10) == (0.25, 0.5, 0.25, 0.0)
    assert b1.flip_01_given_off == pytest.approx(1 / 3)
    assert b0.flip_10_given_on == pytest.approx(0.5)
    # adv_rate - clean_rate == flip_01 - flip_10 for every block
    assert np.allclose(rates.adv_rate - rates.clean_rate, rates.flip_01 - rates.flip_10)
    assert analysis.block_rates(make_records(4, n_gates=0)).empty


# --------------------------------------------------------------------------------------------- summary

def test_success_iff_path_changed():
    n = 200
    changed = np.arange(n) % 2 == 0
    df = make_records(n, success=changed, adv_path=np.where(changed, "0101", "1111"))
    row = analysis.summarize(df, full_macs=full_macs(), n_boot=200).iloc[0]
    assert row.auroc_hamming == 1.0
    assert row.auroc_dmacs == 0.0  # changed paths here skip blocks: lower dMACs predicts success perfectly
    assert row.p_success_changed == 1.0 and row.p_success_unchanged == 0.0
    assert row.n_changed == 100 and row.n_unchanged == 100
    assert row.r_hamming == pytest.approx(1.0)
    assert row.p_success_changed_low > 0.9 and row.p_success_unchanged_high < 0.1
    assert row.success_rate == 0.5 and row.robust_acc == 0.5
    assert row.hamming_mean == 1.0 and row.path_changed == 0.5
    assert row.jaccard_mean == pytest.approx(0.25)  # 0.5 for changed samples ({0,1,2,3} vs {1,3})
    assert row.dmacs_mean == pytest.approx(-1e6) and row.dmacs_pct == pytest.approx(-100 / 6)
    assert row.clean_exec_rate == 1.0 and row.adv_exec_rate == pytest.approx(0.75)


def test_independent_path_change_and_success_give_auroc_half():
    rng = np.random.default_rng(1)
    n = 3000
    changed = rng.random(n) < 0.5
    success = rng.random(n) < 0.3
    df = make_records(n, success=success, adv_path=np.where(changed, "0111", "1111"))
    row = analysis.summarize(df, n_boot=300, seed=3).iloc[0]
    assert abs(row.auroc_hamming - 0.5) < 0.1
    assert row.auroc_hamming_low <= 0.5 <= row.auroc_hamming_high
    assert row.r_hamming_low <= 0.0 <= row.r_hamming_high
    assert row.auroc_hamming_high - row.auroc_hamming_low < 0.1


@pytest.mark.parametrize("discrete", [True, False])
def test_vectorised_statistics_match_scipy(discrete):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 300).astype(float) if discrete else rng.normal(size=300) * 1e6
    y = rng.random(300) < 0.2 + 0.1 * (x > x.mean())
    r = analysis.pointbiserial(x, y, n_boot=0)
    a = analysis.auroc(x, y, n_boot=0)
    assert r.estimate == pytest.approx(stats.pointbiserialr(y, x).statistic)
    u = stats.mannwhitneyu(x[y], x[~y]).statistic
    assert a.estimate == pytest.approx(u / (y.sum() * (~y).sum()))


def test_degenerate_association_is_nan_not_crash():
    df = make_records(50, success=True, adv_path="0000")  # every attack succeeds
    row = analysis.summarize(df, n_boot=50).iloc[0]
    assert math.isnan(row.auroc_hamming) and math.isnan(row.r_hamming) and math.isnan(row.auroc_hamming_low)
    const = make_records(50, success=np.arange(50) < 20)  # no path ever changes: constant predictor
    row = analysis.summarize(const, n_boot=50).iloc[0]
    assert math.isnan(row.auroc_hamming) and math.isnan(row.r_dmacs)
    assert math.isnan(row.p_success_changed) and row.p_success_unchanged == pytest.approx(0.4)


def test_bootstrap_interval_contains_true_mean():
    rng = np.random.default_rng(5)
    values = rng.normal(2.0, 1.0, 400)
    iv = analysis.bootstrap_mean(values, n_boot=1000, seed=1)
    assert iv.low < 2.0 < iv.high
    assert iv.estimate == pytest.approx(values.mean())
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert iv.high - iv.low == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert analysis.bootstrap_mean(values, seed=1) == iv  # seeded: reproducible


def test_frozen_path_share():
    success = np.arange(20) < 10
    frozen_correct = np.arange(20) < 4  # 4 of the 10 successes are undone by freezing the clean path
    df = make_records(20, success=success, frozen_correct=frozen_correct)
    row = analysis.summarize(df, n_boot=0).iloc[0]
    assert row.frozen_survival == pytest.approx(0.6)
    assert row.frozen_survival_low < 0.6 < row.frozen_survival_high


def test_coarse_vs_fine_share():
    n = 20
    labels = np.arange(n) % N_FINE
    success = np.arange(n) < 8
    same_super = np.arange(n) < 3  # 3 of 8 successes stay inside the true superclass
    adv_fine = np.where(success & same_super, labels // PER_SUPER * PER_SUPER + (labels + 1) % PER_SUPER,
                        (labels + PER_SUPER) % N_FINE)
    adv_fine = np.where(success, adv_fine, labels)
    df = make_records(n, success=success, adv_pred_fine=adv_fine)
    row = analysis.summarize(df, fine_to_coarse=FINE_TO_COARSE, n_boot=0).iloc[0]
    assert row.same_superclass == pytest.approx(3 / 8)
    proxy = analysis.summarize(df, n_boot=0)
    assert "same_superclass" not in proxy.columns
    assert proxy.iloc[0].same_superclass_proxy == pytest.approx(3 / 8)  # the coarse head follows the fine class here


def test_ungated_summary_has_no_path_statistics():
    df = make_records(30, n_gates=0, model="resnet", success=np.arange(30) < 10)
    row = analysis.summarize(df, n_boot=50).iloc[0]
    assert not row.gated and math.isnan(row.hamming_mean) and math.isnan(row.auroc_hamming)
    assert row.success_rate == pytest.approx(1 / 3) and row.dmacs_mean == 0.0
    assert not analysis.is_gated(df)


def test_clean_accuracies_and_success_on_initially_correct():
    cc = np.arange(10) < 8
    df = make_records(10, clean_correct=cc, success=np.arange(10) < 2)
    row = analysis.summarize(df, n_boot=0).iloc[0]
    assert row.clean_acc_fine == 0.8 and row.clean_acc_coarse == 0.8
    assert row.n_clean_correct == 8 and row.n_success == 2 and row.success_rate == 0.25
    assert row.robust_acc == 0.6


# --------------------------------------------------------------------------------------------- tables, pairing

def test_worst_case_and_accuracy_table():
    a = make_records(10, attack="fgsm", success=np.arange(10) < 2)
    b = make_records(10, attack="pgd", success=(np.arange(10) >= 1) & (np.arange(10) < 4))
    worst = analysis.worst_case_accuracy(pd.concat([a, b]))
    assert len(worst) == 1
    assert worst.iloc[0].robust_acc == pytest.approx(0.6)  # samples 0..3 broken by one attack or the other
    assert worst.iloc[0].attacks == "fgsm,pgd" and worst.iloc[0].n_attacks == 2
    table = analysis.robust_accuracy_table(pd.concat([a, b]))
    by = table.set_index("attack")["robust_acc"]
    assert by["fgsm"] == 0.8 and by["pgd"] == 0.7 and by["worst"] == pytest.approx(0.6)


def test_paired_difference():
    a = make_records(200, run="a", adv_correct=np.arange(200) < 150)
    b = make_records(200, run="b", adv_correct=np.arange(200) < 100)
    d = analysis.paired_difference(a, b, n_boot=500).iloc[0]
    assert d.n == 200 and d["diff"] == pytest.approx(0.25)
    assert d.diff_low > 0.15 and d.diff_high < 0.35 and d.diff_low < 0.25 < d.diff_high
    same = analysis.paired_difference(a, a.assign(run="c"), n_boot=200).iloc[0]
    assert same["diff"] == 0 and same.diff_low <= 0 <= same.diff_high
    # only shared samples are paired
    part = analysis.paired_difference(a, b.iloc[:50], n_boot=100).iloc[0]
    assert part.n == 50 and part["diff"] == 0
    with pytest.raises(ValueError, match="collapse"):
        analysis.paired_difference(pd.concat([a, a]), b)


def test_strongest_per_sample_takes_worst_gate_grad():
    none = make_records(10, gate_grad="none", success=np.arange(10) < 2)
    bpda = make_records(10, gate_grad="bpda", success=np.arange(10) < 5)
    s = analysis.strongest_per_sample(pd.concat([none, bpda]))
    assert len(s) == 10 and s["adv_correct"].mean() == 0.5 and set(s["attack"]) == {"pgd"}


def test_transfer_matrix():
    wb = make_records(100, run="runA", success=np.arange(100) < 60)
    tr = make_records(100, run="runA", attack="pgd", source_run="runB", success=np.arange(100) < 25)
    tm = analysis.transfer_matrix([wb, tr])
    cross = tm[~tm.whitebox].iloc[0]
    assert (cross.source_run, cross.run, cross.attack, cross.success_rate) == ("runB", "runA", "pgd", 0.25)
    diag = tm[tm.whitebox].iloc[0]
    assert (diag.source_run, diag.run, diag.success_rate) == ("runA", "runA", 0.6)
    assert analysis.transfer_matrix([wb]).empty


def test_primary_evaluation_prefers_more_eps_then_stronger():
    rows = [make_records(10, attack="fgsm", eps=e, success=np.arange(10) < 9) for e in (2 / 255, 8 / 255)]
    rows += [make_records(10, attack="pgd", eps=e, success=np.arange(10) < 5) for e in (2 / 255, 8 / 255)]
    rows += [make_records(10, attack="slowdown", eps=e) for e in (1 / 255, 2 / 255, 8 / 255)]
    fam = analysis.primary_evaluation(pd.concat(rows))
    assert fam["attack"] == "fgsm"
    assert analysis.primary_evaluation(make_records(5, attack="slowdown"))["attack"] == "slowdown"
    assert analysis.primary_evaluation(make_records(5, eps=0.0)) is None


def test_accuracy_rows_follow_attack_kinds():
    frames = [make_records(5, attack=a) for a in ("pgd", "path", "slowdown", "legacy-name")]
    rows = analysis.accuracy_rows(pd.concat(frames, ignore_index=True))
    assert set(rows["attack"]) == {"pgd", "path", "legacy-name"}  # only the compute kind is dropped
    assert len(rows) == 15 and analysis.accuracy_rows(make_records(0)).empty
