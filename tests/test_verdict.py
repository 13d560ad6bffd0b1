"""The one verdict rule (robustness.analysis.verdict), the training-health and comparability guards, the
hierarchical bootstrap over training seeds and the seed-pooled comparison — on constructed numbers and records."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attacks.records import conform
from robustness.findings.compare import compare_runs
from robustness.findings.seeds import compare_seeds
from robustness.analysis.stats import (bootstrap, hierarchical_bootstrap, mcnemar_test, sign_flip_test,
                                       weighted_median_rows)
from robustness.analysis.verdict import (ACCURACY_BAND, ALPHA, MIN_BOTH_CORRECT, MIN_SEEDS_FOR_TEST, ONE_SEED,
                                         RATIO_BAND, Effect, Health, PairedTest, classify, health_reasons, judge)
from robustness.core.errors import RunDirError
from robustness.results import RunResults
from tests.test_analysis import make_records

NOWHERE = Path("/nonexistent")


def ratio(estimate, low, high):
    return Effect("median distance ratio", estimate, low, high, "ratio")


def wilcoxon(p, sign=0, n=71):
    return PairedTest("Wilcoxon", p, sign, n)


# ----------------------------------------------------------------------------------------------------- the rule

def test_an_interval_inside_the_negligible_band_is_no_practical_difference_even_when_significant():
    assert RATIO_BAND == (0.95, 1.05) and ALPHA == 0.05
    assert classify(ratio(1.0, 0.97, 1.04), wilcoxon(0.001, +1))[0] == "equivalent"
    # the measured case that printed "more robust": ratio 1.01 [1.00, 1.03], Wilcoxon p = 0.11
    kind, _ = classify(ratio(1.01, 1.004, 1.03), wilcoxon(0.11, +1))
    assert kind == "equivalent"
    assert classify(ratio(1.01, 1.004, 1.03), wilcoxon(0.01, +1))[0] == "equivalent", "significant, yet negligible"


def test_a_significant_test_whose_interval_contains_no_difference_is_never_a_confident_claim():
    # the measured case against dual: ratio 0.92 [0.85, 1.01], Wilcoxon p = 0.037
    kind, reason = classify(ratio(0.92, 0.85, 1.01), wilcoxon(0.037, -1))
    assert kind == "inconclusive"
    assert "significant (p=0.037)" in reason and "[0.85, 1.01] contains no difference (1)" in reason


def test_every_way_the_test_and_the_interval_can_disagree_is_inconclusive_with_its_reason():
    kind, reason = classify(ratio(1.10, 1.02, 1.20), wilcoxon(0.01, +1))
    assert kind == "inconclusive" and "reaches into the negligible band [0.95, 1.05]" in reason
    kind, reason = classify(ratio(1.20, 1.10, 1.30), wilcoxon(0.20, +1))
    assert kind == "inconclusive" and "excludes no difference (1) but the Wilcoxon test is not significant" in reason
    kind, reason = classify(ratio(1.20, 1.10, 1.30), wilcoxon(0.01, -1))
    assert kind == "inconclusive" and "opposite directions" in reason
    assert classify(ratio(1.0, 0.80, 1.20), wilcoxon(0.50))[0] == "none"
    assert classify(ratio(float("nan"), float("nan"), float("nan")), wilcoxon(float("nan")))[0] == "inconclusive"


def test_a_clear_effect_names_its_test_p_value_effect_size_and_band():
    v = judge("dsn(hard)", "dual", ratio(0.48, 0.35, 0.68), wilcoxon(0.002, -1, n=71), n_both_correct=71)
    assert v.kind == "less" and v.finding == "less robust than dual"
    assert v.evidence == ("median distance ratio 0.48 [0.35, 0.68], Wilcoxon p=0.002, n=71 correct on both; "
                          "negligible band [0.95, 1.05]")
    more = judge("a", "b", ratio(2.0, 1.6, 2.4), wilcoxon(1e-6, +1), n_both_correct=71)
    assert more.kind == "more" and more.finding == "more robust than b"


def test_accuracy_differences_use_a_two_point_band():
    assert ACCURACY_BAND == (-0.02, 0.02)
    diff = lambda e, lo, hi: Effect("robust accuracy difference at eps=8/255", e, lo, hi, "difference")  # noqa: E731
    mcnemar = lambda p, s: PairedTest("exact McNemar", p, s, 120, "paired samples")  # noqa: E731
    assert classify(diff(0.005, -0.01, 0.015), mcnemar(0.6, 1))[0] == "equivalent"
    assert classify(diff(0.10, 0.05, 0.15), mcnemar(0.001, 1))[0] == "more"
    assert classify(diff(0.03, 0.01, 0.05), mcnemar(0.01, 1))[0] == "inconclusive"
    v = judge("a", "b", diff(0.10, 0.05, 0.15), mcnemar(0.001, 1), n_both_correct=100)
    assert "+10.0 points [+5.0, +15.0], exact McNemar p=0.001" in v.evidence and "±2 points" in v.evidence


# ------------------------------------------------------------------------------------------------ the guards

def test_health_guard_flags_a_twin_far_below_and_a_model_near_chance():
    assert health_reasons(Health("dsn", 0.54), Health("dual", 0.68)) == [
        "their clean accuracies differ by 14.0 points (more than 10)"]
    assert health_reasons(Health("dsn", 0.60), Health("dual", 0.68)) == []
    near = health_reasons(Health("dsn", 0.11, clean_fine=0.11, chance=0.0625),
                          Health("dual", 0.12, clean_fine=0.12, chance=0.0625))
    assert len(near) == 2 and "dsn is near chance on the attacked samples (11.0%, below 2 x chance = 12.5%)" in near
    trained = health_reasons(Health("dsn", 0.9, final_fine=0.1, chance=0.0625, run="dsn"), Health("dual", 0.9))
    assert trained == ["dsn ended training near chance (test accuracy 10.0%, below 12.5%)"]
    assert health_reasons(Health("dsn", 0.11), Health("dual", 0.12)) == [], "chance unknown: that test is skipped"
    v = judge("dsn", "dual", ratio(2.0, 1.6, 2.4), wilcoxon(1e-6, +1), n_both_correct=50,
              health=(Health("dsn", 0.54, chance=0.0625), Health("dual", 0.68, chance=0.0625)))
    assert v.kind == "confounded" and not v.answer
    assert v.finding.startswith("confounded by clean accuracy (dsn 54.0% vs dual 68.0%, chance 6.2%)")


def test_fewer_than_the_minimum_samples_correct_on_both_is_not_comparable():
    assert MIN_BOTH_CORRECT == 10
    v = judge("a", "b", ratio(2.0, 1.6, 2.4), wilcoxon(1e-6, +1), n_both_correct=9)
    assert v.kind == "not-comparable"
    assert v.finding == "not comparable: only 9 samples are classified correctly by both a and b (at least 10 needed)"
    assert judge("a", "b", ratio(2.0, 1.6, 2.4), wilcoxon(1e-6, +1), n_both_correct=10).kind == "more"


def distance_records(distance, clean_correct=None, *, run="dsn", gated=True, gate_grad="none"):
    """Minimal-attack records (eps = inf) whose per-sample distance is ``distance`` (inf: never fooled)."""
    distance = np.asarray(distance, float)
    n = len(distance)
    cc = np.ones(n, bool) if clean_correct is None else np.asarray(clean_correct, bool)
    df = make_records(n, run=run, model="dsn" if gated else "dual", attack="pgd-bisect", backend="native",
                      eps=np.inf, gate_grad=gate_grad, n_gates=4 if gated else 0, clean_correct=cc,
                      success=np.isfinite(distance) & cc)
    df["linf"] = np.where(np.isfinite(distance), distance, 1.0)
    return conform(df)


def result(records, name, **kw):
    return RunResults(path=NOWHERE / name, name=name, records=records, **kw)


def pair(dsn_distance, dual_distance, dsn_correct=None, dual_correct=None, dsn_kw=None, dual_kw=None, n_boot=200):
    return compare_runs([result(distance_records(dsn_distance, dsn_correct, run="dsn"), "dsn", **(dsn_kw or {})),
                         result(distance_records(dual_distance, dual_correct, run="dual", gated=False), "dual",
                                **(dual_kw or {}))], n_boot=n_boot)


def test_a_twin_twenty_points_below_makes_the_comparison_confounded_with_a_failed_health_check():
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 4, 100) / 255
    cmp = pair(base * 2, base, dsn_correct=np.arange(100) >= 20)       # dsn 80% vs dual 100% clean
    v = cmp.verdicts[0]
    assert v.kind == "confounded" and cmp.distance_pairs[0].direction() == "more", "the ratio alone says more"
    assert cmp.lead.startswith("Skipping (dsn(hard)): confounded by clean accuracy (dsn(hard) 80.0% vs dual "
                               "100.0%): their clean accuracies differ by 20.0 points (more than 10)")
    assert "more robust" not in cmp.lead
    assert not cmp.comparable and cmp.confounded and not cmp.not_comparable
    health = [c for c in cmp.health if c.name == "training health"]
    assert [c.status for c in health] == ["fail"] and "80.0%" in health[0].evidence


def test_near_chance_uses_the_attacked_samples_and_the_final_training_accuracy():
    rng = np.random.default_rng(1)
    base = rng.uniform(1, 4, 200) / 255
    manifest = {"dataset": {"name": "synthetic", "fine_classes": [str(i) for i in range(10)]}}   # chance 10%
    low = np.arange(200) < 30                                                                       # 15% correct
    cmp = pair(base * 2, base, low, np.arange(200) < 34, dict(manifest=manifest), dict(manifest=manifest))
    assert cmp.verdicts[0].kind == "confounded" and "near chance on the attacked samples" in cmp.verdicts[0].finding
    metrics = pd.DataFrame({"epoch": [0, 1], "test_acc_fine": [0.1, 0.12]})
    healthy = pair(base * 2, base, dsn_kw=dict(manifest=manifest, metrics=metrics), dual_kw=dict(manifest=manifest))
    assert healthy.verdicts[0].kind == "confounded"
    assert "dsn ended training near chance (test accuracy 12.0%, below 20.0%)" in healthy.verdicts[0].finding
    fine = pair(base * 2, base, dsn_kw=dict(manifest=manifest), dual_kw=dict(manifest=manifest))
    assert fine.verdicts[0].kind == "more" and fine.comparable
    assert [c.status for c in fine.health] == ["pass", "pass"]


def test_too_few_samples_correct_on_both_or_different_images_or_data_are_not_comparable():
    base = np.linspace(1, 4, 9) / 255
    few = pair(base * 2, base)
    assert few.verdicts[0].kind == "not-comparable" and "only 9 samples" in few.lead and not few.comparable
    rng = np.random.default_rng(2)
    base = rng.uniform(1, 4, 60) / 255
    images = pair(base * 2, base, dsn_kw=dict(manifest={"subset": {"sha256": "a" * 64}}),
                  dual_kw=dict(manifest={"subset": {"sha256": "b" * 64}}))
    assert images.verdicts[0].kind == "not-comparable" and "attacked on different images" in images.lead
    same = pair(base * 2, base, dsn_kw=dict(manifest={"subset": {"sha256": "a" * 64}, "seed": 1}),
                dual_kw=dict(manifest={"subset": {"sha256": "a" * 64}, "seed": 2}))
    assert same.verdicts[0].kind == "more", "the same image hash: a different attack seed does not matter"
    older = pair(base * 2, base, dsn_kw=dict(manifest={"seed": 1}), dual_kw=dict(manifest={"seed": 2}))
    assert "different evaluation sets" in older.verdicts[0].reason
    data = pair(base * 2, base, dsn_kw=dict(config={"dataset": "synthetic", "data_options": {"image_size": 16}}),
                dual_kw=dict(config={"dataset": "synthetic", "data_options": {"image_size": 32}}))
    assert data.verdicts[0].kind == "not-comparable" and "trained on different data" in data.lead
    assert [c.status for c in data.health if c.name == "same samples"] == ["fail"]


def test_two_variants_of_one_run_are_held_to_the_same_clean_accuracy_rule():
    rng = np.random.default_rng(3)
    base = rng.uniform(1, 4, 100) / 255
    hard = distance_records(base * 2, np.arange(100) >= 25, run="dsn")
    open_ = distance_records(base, run="dsn").assign(gate_mode="open")
    cmp = compare_runs([result(pd.concat([hard, open_], ignore_index=True), "dsn")], n_boot=100)
    assert [(v.a, v.b, v.kind) for v in cmp.verdicts] == [("dsn(hard)", "dsn(open)", "confounded")]


def test_strict_compare_exits_2_on_a_confounded_pair_and_0_with_a_warning_without(tmp_path, capsys):
    from robustness.app.cli import main
    from tests.test_reports import N, write_run
    rng = np.random.default_rng(4)
    base = rng.uniform(1, 4, N) / 255
    dsn = write_run(tmp_path, distance_records(base * 2, np.arange(N) >= 30, run="dsn"))
    dual = write_run(tmp_path, distance_records(base, run="dual", gated=False), gated=False)
    assert main(["compare", str(dsn), str(dual), "--out", str(tmp_path / "cmp"), "--bootstrap", "50",
                 "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dsn-robust compare: not an answer (--strict): dsn(hard) vs dual: confounded by "
                              "clean accuracy (dsn(hard) 75.0% vs dual 100.0%)")
    assert (tmp_path / "cmp" / "index.html").is_file(), "the comparison is still written"
    payload = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert payload["comparable"] is False and payload["pair_verdicts"][0]["kind"] == "confounded"
    assert [h["status"] for h in payload["health"] if h["name"] == "training health"] == ["fail"]
    html = (tmp_path / "cmp" / "index.html").read_text()
    assert "Training health and comparability" in html and "status-fail" in html
    assert main(["compare", str(dsn), str(dual), "--out", str(tmp_path / "cmp2"), "--bootstrap", "50"]) == 0
    assert "warning: not an answer" in capsys.readouterr().err
    healthy = write_run(tmp_path / "h", distance_records(base * 2, run="dsn"))
    assert main(["compare", str(healthy), str(dual), "--out", str(tmp_path / "cmp3"), "--bootstrap", "50",
                 "--strict"]) == 0


def test_the_fixed_eps_fallback_names_its_mcnemar_test_and_never_speaks_where_both_are_saturated():
    n = 80
    runs = []
    for run, acc in (("dsn", 0.7), ("dual", 0.3)):
        gates = 4 if run == "dsn" else 0
        parts = [make_records(n, run=run, model=run, eps=1 / 255, adv_correct=np.arange(n) < acc * n, n_gates=gates),
                 make_records(n, run=run, model=run, eps=0.5 / 255, n_gates=gates),           # fools nothing
                 make_records(n, run=run, model=run, eps=8 / 255, adv_correct=np.zeros(n, bool), n_gates=gates)]
        runs.append(result(pd.concat(parts, ignore_index=True), run))
    cmp = compare_runs(runs, n_boot=200)
    p = cmp.pairs[0]
    assert p["eps"] == pytest.approx(1 / 255) and p["candidates"] == 1, "0.5/255 and 8/255 are saturated"
    assert cmp.verdicts[0].kind == "more"
    assert "exact McNemar p=" in cmp.verdict and "32 vs 0 discordant" in cmp.verdict
    assert p["mcnemar_p"] == pytest.approx(mcnemar_test(np.arange(n) < 56, np.arange(n) < 24)[0])


# --------------------------------------------------------------------------------- the hierarchical bootstrap

def test_weighted_median_and_the_seed_level_tests_by_hand():
    rng = np.random.default_rng(5)
    x = rng.normal(size=13)
    w = rng.integers(0, 3, size=(20, 13))
    expect = [np.median(np.repeat(x, r)) if r.sum() else np.nan for r in w]
    np.testing.assert_allclose(weighted_median_rows(x, w), expect)
    assert sign_flip_test([0.2, 0.3, 0.1]) == (0.25, 1), "3 seeds: the smallest two-sided p is 2/8"
    assert MIN_SEEDS_FOR_TEST == 6 and sign_flip_test([0.2] * 6)[0] == pytest.approx(2 / 64)
    assert sign_flip_test([0.2, -0.3, 0.1])[0] > 0.5
    p, sign, b, c = mcnemar_test([1, 1, 1, 1, 0, 1], [0, 0, 0, 0, 0, 1])
    assert (b, c, sign) == (4, 0, 1) and p == pytest.approx(0.125)


def test_a_seed_dependent_effect_widens_the_pooled_interval_beyond_every_single_seed():
    rng = np.random.default_rng(6)
    groups = [rng.normal(mu, 0.05, 100) for mu in (0.30, -0.10, 0.10)]   # the effect depends on the seed
    ids = [np.arange(100)] * 3
    single = [bootstrap(lambda r: np.median(r, axis=1), [g], 1000, 0) for g in groups]
    pooled = hierarchical_bootstrap(groups, ids, n_boot=1000, seed=0)
    assert pooled.high - pooled.low > 3 * max(s.high - s.low for s in single)
    assert pooled.low < -0.05 and pooled.high > 0.25, "the interval reaches across the seeds' effects"
    nested = hierarchical_bootstrap(groups, n_boot=1000, seed=0)
    assert nested.high - nested.low > 3 * max(s.high - s.low for s in single)


def test_identical_seeds_give_about_one_seeds_interval_and_the_bootstrap_is_deterministic_and_fast():
    rng = np.random.default_rng(7)
    g = rng.normal(0.2, 0.3, 100)
    one = bootstrap(lambda r: np.median(r, axis=1), [g], 2000, 0)
    three = hierarchical_bootstrap([g, g, g], [np.arange(100)] * 3, n_boot=2000, seed=0)
    assert three.estimate == pytest.approx(one.estimate)
    assert (three.high - three.low) == pytest.approx(one.high - one.low, rel=0.2)
    # without the shared image ids, three copies would pass for 300 independent samples: too narrow
    nested = hierarchical_bootstrap([g, g, g], n_boot=2000, seed=0)
    assert nested.high - nested.low < 0.75 * (one.high - one.low)
    assert hierarchical_bootstrap([g, g], n_boot=300, seed=3) == hierarchical_bootstrap([g, g], n_boot=300, seed=3)
    assert hierarchical_bootstrap([g, g], n_boot=300, seed=3) != hierarchical_bootstrap([g, g], n_boot=300, seed=4)
    groups = [rng.normal(0, 1, 100) for _ in range(3)]
    for ids in (None, [np.arange(100)] * 3):
        start = time.perf_counter()
        hierarchical_bootstrap(groups, ids, n_boot=1000, seed=0)
        assert time.perf_counter() - start < 0.5


# --------------------------------------------------------------------------------------- seed-pooled comparison

def seed_runs(factors, n=60, dsn_correct=None, seed=0, noise=0.02):
    """Per training seed [dsn, dual] whose per-sample distance ratio is ``factor`` (times a little noise)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(1, 4, n) / 255
    out = {}
    for s, f in enumerate(factors):
        jitter = np.exp(rng.normal(0, noise, n))
        correct = None if dsn_correct is None else dsn_correct.get(s)
        out[s] = [result(distance_records(base * f * jitter, correct, run="dsn"), "dsn"),
                  result(distance_records(base, run="dual", gated=False), "dual")]
    return out


def test_one_seed_says_its_interval_covers_test_samples_only():
    cmp = compare_seeds(seed_runs([1.6]), n_boot=200)
    assert ONE_SEED == "one training seed: the interval covers test samples only"
    assert ONE_SEED in cmp.verdict and ONE_SEED in cmp.lead and cmp.scope == ONE_SEED
    assert cmp.pooled[0].verdict.kind == "more" and cmp.pooled[0].test.name == "Wilcoxon"
    plain = compare_runs(seed_runs([1.6])[0], n_boot=200)
    assert ONE_SEED in plain.lead and ONE_SEED in plain.verdict


def test_three_consistent_seeds_cannot_claim_more_by_the_seed_level_test_six_can():
    three = compare_seeds(seed_runs([1.6, 1.5, 1.7]), n_boot=300)
    p = three.pooled[0]
    assert p.test.name == "seed-level sign-flip" and p.test.p == pytest.approx(0.25)
    assert p.ratio.low > 1.05 and p.verdict.kind == "inconclusive"
    assert "3 seeds cannot reach p < 0.05 by this test" in p.verdict.reason
    assert "3 training seeds: the interval covers training seeds and test samples" in three.lead
    assert [p.seed_findings[s] for s in three.seeds] == ["more robust than dual"] * 3
    six = compare_seeds(seed_runs([1.6, 1.5, 1.7, 1.55, 1.65, 1.6]), n_boot=300)
    assert six.pooled[0].verdict.kind == "more" and six.pooled[0].test.p < ALPHA
    assert six.lead.startswith("Skipping (dsn(hard)): more robust than dual — 6 training seeds")


def test_a_seed_dependent_fake_effect_widens_the_pooled_ratio_interval():
    cmp = compare_seeds(seed_runs([1.5, 0.8, 1.1]), n_boot=500)
    p = cmp.pooled[0]
    widths = {s: iv.high - iv.low for s, iv in p.seed_intervals.items()}
    assert (p.ratio.high - p.ratio.low) > max(widths.values())
    assert p.ratio.low < 0.9 and p.ratio.high > 1.4
    assert p.verdict.kind in ("none", "inconclusive")


def test_a_seed_confounded_by_clean_accuracy_confounds_the_pooled_verdict_and_names_the_seed():
    cmp = compare_seeds(seed_runs([1.6, 1.6, 1.6], dsn_correct={1: np.arange(60) >= 15}), n_boot=200)
    v = cmp.pooled[0].verdict
    assert v.kind == "confounded" and "seed 1: dsn(hard) 75.0% vs dual 100.0%" in v.reason
    assert not cmp.comparable and cmp.confounded
    with pytest.raises(RunDirError, match="same models"):
        compare_seeds({0: seed_runs([1.0])[0], 1: seed_runs([1.0])[0][:1]})


def test_the_seed_comparison_page_shows_the_pooled_verdict_then_every_seed_then_the_details(tmp_path):
    from reports.compare_page import write_comparison
    cmp = compare_seeds(seed_runs([1.5, 0.8, 1.1]), n_boot=200)
    out = write_comparison(cmp, tmp_path / "seeds")
    html = (out / "index.html").read_text()
    assert html.index("Pooled verdict per pair") < html.index("Per-seed verdicts") < html.index("Verdict per pair")
    assert "hierarchical bootstrap" in html and "seed 0&#39;s comparison" in html
    payload = json.loads((out / "compare.json").read_text())
    assert payload["kind"] == "seeds" and payload["seeds"] == [0, 1, 2] and payload["verdict"] == cmp.verdict
    assert set(payload["per_seed"]) == {"0", "1", "2"}
    assert payload["per_seed"]["1"]["distance_verdict"][0]["ratio"]["estimate"] == pytest.approx(0.8, rel=0.05)
    pooled = payload["pooled"][0]
    assert pooled["verdict"]["test"]["name"] == "seed-level sign-flip" and len(pooled["seed_intervals"]) == 3
    assert set(pd.read_csv(out / "compare.csv")["seed"]) == {0, 1, 2}
    assert "Per-seed verdicts" in (out / "compare.md").read_text()
