"""``compare`` refuses to pretend: a pair with too few paired samples, a model at chance level on clean data, or
sides attacked on different images or data is "not comparable: <reason>" in the verdict, the checks, compare.json
and the terminal line, and ``dsn-robust compare --strict`` exits 2 on it; a healthy pair stays comparable."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from robustness.findings.compare import compare_runs
from robustness.analysis.verdict import (CHANCE_ALPHA, MIN_BOTH_CORRECT, NEAR_CHANCE_FACTOR, Health, binomial_sf,
                                         chance_level_reasons, chance_p, judge)
from tests.test_verdict import distance_records, ratio, result, wilcoxon

CLASSES = [str(i) for i in range(10)]                                     # chance 10%
INFO = {"name": "synthetic", "fine_classes": CLASSES, "coarse_classes": ["a", "b"],
        "fine_to_coarse": [c // 5 for c in range(10)], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
        "image_size": 32, "channels": 3}
SOURCE = {"dataset": "synthetic", "data_root": "/data", "data_options": {"image_size": 32}, "split": "test"}


def manifest(n=60, sha="a" * 64, info=None, data=None):
    """An attack manifest as ``attacks.runner`` writes its comparability entries."""
    return {"n": n, "seed": 0, "subset": {"rule": "stratified", "seed": 0, "sha256": sha},
            "dataset": dict(info or INFO), "data": dict(data or SOURCE)}


def pair(dsn_correct=None, dual_correct=None, *, n=60, dsn_kw=None, dual_kw=None, factor=2.0):
    """dsn (skipping) whose per-sample distance is ``factor`` x the dual's, on ``n`` shared samples."""
    base = np.random.default_rng(0).uniform(1, 4, n) / 255
    dsn_kw = {"manifest": manifest(n)} if dsn_kw is None else dsn_kw
    dual_kw = {"manifest": manifest(n)} if dual_kw is None else dual_kw
    return compare_runs([result(distance_records(base * factor, dsn_correct, run="dsn"), "dsn", **dsn_kw),
                         result(distance_records(base, dual_correct, run="dual", gated=False), "dual", **dual_kw)],
                        n_boot=100)


def check(cmp, name):
    return [c for c in cmp.health if c.name == name]


# -------------------------------------------------------------------------------------------- a healthy pair

def test_a_healthy_pair_with_identical_manifests_stays_comparable_and_says_more():
    cmp = pair()
    v = cmp.verdicts[0]
    assert v.kind == "more" and v.finding == "more robust than dual" and cmp.comparable
    assert not cmp.not_comparable and "not comparable" not in cmp.verdict
    assert [c.status for c in cmp.health] == ["pass", "pass"]
    assert "above chance by a one-sided binomial test" in check(cmp, "training health")[0].evidence
    # where the data lie on disk, or the attack seed, is no difference of data or images
    moved = pair(dual_kw={"manifest": {**manifest(), "seed": 7, "data": {**SOURCE, "data_root": "/elsewhere"}}})
    assert moved.verdicts[0].kind == "more" and moved.comparable


# ------------------------------------------------------------------------------------ too few paired samples

def test_one_paired_sample_is_not_comparable_and_names_the_count():
    n = 30
    dsn_correct, dual_correct = np.arange(n) <= 15, np.arange(n) >= 15     # only sample 15 is correct on both
    cmp = pair(dsn_correct, dual_correct, n=n)
    v = cmp.verdicts[0]
    assert v.kind == "not-comparable" and not v.answer and not cmp.comparable
    expected = (f"only 1 sample is classified correctly by both dsn(hard) and dual (at least {MIN_BOTH_CORRECT} "
                "needed)")
    assert v.reason == expected, "the count is the only reason: both sides are well above chance"
    assert v.finding == f"not comparable: {expected}"
    assert f"Skipping (dsn(hard)): not comparable: {expected} — " in cmp.lead
    for text in (cmp.lead, cmp.verdict):
        assert "more robust" not in text and "less robust" not in text and "no evidence" not in text
    same = check(cmp, "same samples")
    assert [c.status for c in same] == ["fail"] and expected in same[0].evidence
    assert cmp.not_comparable == [f"dsn(hard) vs dual: not comparable: {expected}"]


def test_the_minimum_of_paired_samples_is_a_threshold_not_a_guess():
    effect, test = ratio(2.0, 1.6, 2.4), wilcoxon(1e-6, +1)
    assert judge("a", "b", effect, test, n_both_correct=MIN_BOTH_CORRECT - 1).kind == "not-comparable"
    assert judge("a", "b", effect, test, n_both_correct=MIN_BOTH_CORRECT).kind == "more"
    assert "only 3 samples are classified correctly by both a and b" in judge(
        "a", "b", effect, test, n_both_correct=3).reason


# ------------------------------------------------------------------------------------------------ at chance

def test_a_model_at_chance_on_clean_data_is_not_comparable_naming_chance():
    n = 200
    dual_correct = np.arange(n) < 24                         # 12% against chance 10%: binomial p = 0.2
    cmp = pair(None, dual_correct, n=n)
    v = cmp.verdicts[0]
    assert v.kind == "not-comparable", "at chance is no answer, not merely confounded"
    p = stats.binom.sf(23, n, 0.1)
    assert p > CHANCE_ALPHA
    assert (f"dual is at chance level on clean data (24 of 200 attacked samples correct = 12.0%, not "
            f"significantly above chance 10.0%: one-sided binomial p={p:.2g} ≥ 0.05)") in v.reason
    assert v.finding.startswith("not comparable: ") and "chance" in cmp.lead
    assert "more robust" not in cmp.lead
    health = check(cmp, "training health")
    assert [c.status for c in health] == ["fail"] and "at chance level" in health[0].evidence
    assert [c.status for c in check(cmp, "same samples")] == ["pass"], "the samples themselves are the same"


def test_significantly_above_chance_but_near_it_stays_confounded_not_not_comparable():
    n = 200
    cmp = pair(np.arange(n) < 36, np.arange(n) < 34, n=n)   # 18% and 17%: above chance (p < 0.01), below 2 x chance
    v = cmp.verdicts[0]
    assert v.kind == "confounded" and "near chance" in v.finding and "at chance level" not in v.finding


def test_the_binomial_tail_is_exact_and_a_pair_the_other_guards_pass_is_never_at_chance():
    for k, n, p in [(3, 20, 1 / 16), (10, 50, 0.1), (150, 1000, 0.1), (1, 20, 1 / 16), (0, 5, 0.1), (6, 5, 0.5)]:
        assert binomial_sf(k, n, p) == pytest.approx(stats.binom.sf(k - 1, n, p), rel=1e-9, abs=1e-15)
    # the weakest side the other guards let through: MIN_BOTH_CORRECT correct answers at exactly
    # NEAR_CHANCE_FACTOR x chance; for any number of classes it is significantly above chance
    for classes in [2, 3, 4, 5, 10, 16, 20, 100, 1000, 10_000]:
        chance = 1 / classes
        for k in (MIN_BOTH_CORRECT, MIN_BOTH_CORRECT + 1, 2 * MIN_BOTH_CORRECT):
            n = math.floor(k / (NEAR_CHANCE_FACTOR * chance) + 1e-9)
            side = Health("m", k / n, clean_fine=k / n, chance=chance, n=n)
            assert chance_p(side) < CHANCE_ALPHA and chance_level_reasons(side, side) == []
    unknown = Health("m", 0.1, clean_fine=0.1, chance=0.1)   # no sample count: the test is skipped
    assert chance_p(unknown) is None and chance_level_reasons(unknown, unknown) == []


# ------------------------------------------------------------------------------ different images or data

def test_different_subset_hashes_and_sample_counts_are_not_comparable_naming_the_difference():
    cmp = pair(dsn_kw={"manifest": manifest(100, "a" * 64)}, dual_kw={"manifest": manifest(20, "b" * 64)})
    v = cmp.verdicts[0]
    assert v.kind == "not-comparable" and cmp.distance_pairs[0].direction() == "more", "the ratio alone says more"
    assert ("dsn(hard) and dual were attacked on different images (100 vs 20 attacked samples; subset sha256 "
            "aaaaaaaaaaaa vs bbbbbbbbbbbb)") in v.reason
    assert "more robust" not in cmp.lead and "not comparable: dsn(hard) and dual were attacked" in cmp.lead
    assert [c.status for c in check(cmp, "same samples")] == ["fail"]
    counts = pair(dsn_kw={"manifest": manifest(100)}, dual_kw={"manifest": manifest(20)})
    assert counts.verdicts[0].kind == "not-comparable"
    assert "attacked on different sample sets (100 vs 20 attacked samples)" in counts.verdicts[0].reason


def test_different_data_options_or_dataset_are_not_comparable_naming_the_difference():
    small = {**SOURCE, "data_options": {"image_size": 16}}
    options = pair(dual_kw={"manifest": manifest(data=small)})
    assert options.verdicts[0].kind == "not-comparable"
    assert ("dsn(hard) and dual were attacked on different data (data_options {'image_size': 32} vs "
            "{'image_size': 16})") in options.verdicts[0].reason
    other = pair(dual_kw={"manifest": manifest(info={**INFO, "name": "cifar100", "fine_classes": CLASSES[:5] * 2,
                                                     "image_size": 16}, data={**SOURCE, "dataset": "cifar100"})})
    reason = other.verdicts[0].reason
    assert other.verdicts[0].kind == "not-comparable"
    assert "attacked on different data (dataset synthetic vs cifar100; fine class names differ" in reason
    assert reason.count("cifar100") == 1, "the manifests' dataset entry and data entry name it once"
    assert "image size differs (32 vs 16)" in reason
    # the runs' config.json: named once, as training data, not again from the manifests
    configs = pair(dsn_kw={"manifest": manifest(data={**SOURCE, "data_options": {}}),
                           "config": {"dataset": "synthetic", "data_options": {}}},
                   dual_kw={"manifest": manifest(data={**SOURCE, "data_options": {"noise": 0.5}}),
                            "config": {"dataset": "synthetic", "data_options": {"noise": 0.5}}})
    reason = configs.verdicts[0].reason
    assert "trained on different data (data_options {} vs {'noise': 0.5})" in reason
    assert reason.count("{'noise': 0.5}") == 1
    assert configs.lead.count("not comparable") == 1 and "more robust" not in configs.lead


def test_several_reasons_make_one_clause_of_the_lead():
    n = 30
    cmp = pair(np.arange(n) <= 15, np.arange(n) >= 15, n=n, dsn_kw={"manifest": manifest(n, "a" * 64)},
               dual_kw={"manifest": manifest(n, "b" * 64)})
    v = cmp.verdicts[0]
    assert v.reason.count(" and dual were attacked on different images") == 1
    assert "(subset sha256 aaaaaaaaaaaa vs bbbbbbbbbbbb) and only 1 sample is classified" in v.reason
    assert "; " not in v.reason, "the lead separates pairs by '; '"


# ---------------------------------------------------------------------------------------------------- the CLI

def test_strict_compare_exits_2_on_a_not_comparable_pair_and_every_output_says_why(tmp_path, capsys):
    from robustness.app.cli import main
    from tests.test_reports import N, write_run
    base = np.random.default_rng(4).uniform(1, 4, N) / 255
    dsn = write_run(tmp_path, distance_records(base * 2, run="dsn"))
    dual = write_run(tmp_path, distance_records(base, np.arange(N) == 0, run="dual", gated=False), gated=False)
    reason = "only 1 sample is classified correctly by both dsn(hard) and dual (at least 10 needed)"
    assert main(["compare", str(dsn), str(dual), "--out", str(tmp_path / "cmp"), "--bootstrap", "20",
                 "--strict"]) == 2
    out, err = capsys.readouterr()
    assert f"not comparable: {reason}" in out and "more robust" not in out.split("Evidence")[0]
    assert err.strip().splitlines()[-1].startswith(
        f"dsn-robust compare: not an answer (--strict): dsn(hard) vs dual: not comparable: {reason}")
    payload = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert payload["comparable"] is False and payload["pair_verdicts"][0]["kind"] == "not-comparable"
    assert payload["pair_verdicts"][0]["finding"] == f"not comparable: {reason}"
    html = (tmp_path / "cmp" / "index.html").read_text()
    assert f"not comparable: {reason}" in html and "a side at chance level on clean data" in html
    assert payload["verdict_rule"]["chance_alpha"] == CHANCE_ALPHA
    assert main(["compare", str(dsn), str(dual), "--out", str(tmp_path / "cmp2"), "--bootstrap", "20"]) == 0
    out, err = capsys.readouterr()
    assert f"not comparable: {reason}" in out and "warning: not an answer" in err
