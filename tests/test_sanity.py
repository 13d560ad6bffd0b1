"""Gradient-masking checks: each passes on honest records and warns on records built to violate it."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attacks.base import COMPUTE, ITERATIVE, MINIMAL, Attack, attack_kind, register, unregister
from robustness import sanity
from test_analysis import make_records

N = 200
E2, E8, BIG = 2 / 255, 8 / 255, 0.5


def curves(spec: dict[tuple[str, str, float], float], run: str = "runA", n: int = N, **kw) -> pd.DataFrame:
    """Records where (attack, gate_grad, eps) leaves the given robust accuracy (first samples stay correct)."""
    return pd.concat([make_records(n, run=run, attack=a, gate_grad=g, eps=e, adv_correct=np.arange(n) < round(acc * n),
                                   **kw)
                      for (a, g, e), acc in spec.items()], ignore_index=True)


HONEST = {
    ("pgd", "none", 0.0): 0.9, ("pgd", "none", E2): 0.6, ("pgd", "none", E8): 0.25, ("pgd", "none", BIG): 0.0,
    ("pgd", "bpda", E2): 0.59, ("pgd", "bpda", E8): 0.24,
    ("fgsm", "none", E2): 0.7, ("fgsm", "none", E8): 0.45,
    ("square", "none", E2): 0.66, ("square", "none", E8): 0.26,  # too weak at 2/255, as strong as pgd at 8/255
}


def with_(**changes: float) -> dict:
    spec = dict(HONEST)
    for key, acc in changes.items():
        attack, grad, eps = key.split("__")
        spec[(attack, grad, {"E2": E2, "E8": E8, "BIG": BIG}[eps])] = acc
    return spec


@pytest.fixture(scope="module")
def honest() -> pd.DataFrame:
    return curves(HONEST)


def by_name(checks):
    return {c.name: c for c in checks}


def test_all_checks_pass_on_honest_records(honest):
    checks = by_name(sanity.run_checks(honest, zero_grad_share=0.0))
    for name in ["eps-monotone", "iterative-vs-single-step", "unbounded-attack", "square-vs-gradient",
                 "routing-gradient", "zero-input-gradient"]:
        assert checks[name].status == "pass", checks[name]
    assert checks["transfer-vs-whitebox"].status == "skip"
    assert all(c.evidence.endswith(".") and any(ch.isdigit() for ch in c.evidence) for c in checks.values()
               if c.status == "pass")
    assert sanity.worst_status(checks.values()) == "pass"


def test_accuracy_rising_with_eps_warns():
    c = sanity.check_eps_monotone(curves(with_(pgd__none__E8=0.7)))
    assert c.status == "warn" and "rises with eps" in c.evidence and "70.0%" in c.evidence
    # one sample of noise is tolerated
    assert sanity.check_eps_monotone(curves(with_(pgd__none__BIG=0.25 + 1 / N))).status == "pass"


def test_single_step_stronger_than_iterative_warns():
    c = sanity.check_iterative_vs_single_step(curves(with_(fgsm__none__E8=0.1)))
    assert c.status == "warn" and "fgsm 10.0%" in c.evidence


def test_unbounded_attack_must_reach_zero():
    c = sanity.check_unbounded(curves(with_(pgd__none__BIG=0.3)))
    assert c.status == "warn" and "30.0%" in c.evidence
    inf = curves({("pgd", "none", float("inf")): 0.0, ("pgd", "none", E8): 0.2})
    assert sanity.check_unbounded(inf).status == "pass"
    assert sanity.check_unbounded(curves({("pgd", "none", E8): 0.2})).status == "skip"


def test_square_beating_gradient_attacks_warns():
    c = sanity.check_square_vs_gradient(curves(with_(square__none__E8=0.05)))
    assert c.status == "warn" and "gradient masking suspected" in c.evidence.lower()
    assert "square 5.0% vs pgd/bpda 24.0% at eps=8/255" in c.evidence
    assert "b=38 robust only under pgd/bpda, c=0 only under square" in c.evidence
    assert sanity.check_square_vs_gradient(curves({("pgd", "none", E8): 0.2})).status == "skip"


def test_square_beating_gradient_attacks_by_noise_passes():
    # 2 samples of 64 (3.1 points, above the 3-point margin): not significant, and Square is as strong -> power
    spec = {("pgd", "none", E8): 30 / 64, ("square", "none", E8): 28 / 64}
    c = sanity.check_square_vs_gradient(curves(spec, n=64))
    assert c.status == "pass" and "could have fired" in c.evidence


def test_honest_square_names_where_it_had_power(honest):
    c = sanity.check_square_vs_gradient(honest)
    assert c.status == "pass" and "at eps=8/255, so it could have fired there" in c.evidence
    assert "at eps=2/255 (66.0% vs 59.0%) it was too weak" in c.evidence


def test_weak_square_warns_that_it_could_not_detect_masking():
    spec = {("pgd", "none", E8): 0.26, ("square", "none", E8): 0.98}
    checks = by_name(sanity.run_checks(curves(spec), queries={"runA": 5000}))
    c = checks["square-vs-gradient"]
    assert c.status == "warn" and "masking suspected" not in c.evidence
    assert c.evidence.startswith("Square (5000 queries) was too weak to detect masking: it left 98.0% where the "
                                 "gradient attacks left 26.0%")
    assert c.evidence.endswith("raise its queries.")
    unknown = sanity.check_square_vs_gradient(curves(spec))  # no budget given: none invented
    assert unknown.status == "warn" and "queries)" not in unknown.evidence


def test_strong_square_passes_and_could_have_fired():
    spec = {("pgd", "none", E8): 0.26, ("square", "none", E8): 0.27}
    c = sanity.check_square_vs_gradient(curves(spec), queries={"runA": 5000})
    assert c.status == "pass" and "Square (5000 queries)" in c.evidence and "could have fired" in c.evidence
    assert "too weak" not in c.evidence


def test_bpda_beating_none_warns():
    c = sanity.check_routing_gradients(curves(with_(pgd__bpda__E8=0.05)))  # 20 points below 'none'
    assert c.status == "warn" and "bpda is significantly stronger than 'none' in 1 of 2 settings" in c.evidence
    assert "'none') evaluation alone is masked" in c.evidence and "weaker" not in c.evidence
    assert "none 25.0% vs bpda 5.0% (b=40 robust only under none, c=0 only under bpda" in c.evidence
    assert len(c.details) == 1 and "eps=8/255" in c.details[0]
    assert sanity.check_routing_gradients(curves({("pgd", "none", E8): 0.2})).status == "skip"


# --------------------------------------------------------------------------------------------- paired routing

M = 64


def paired(spec: dict[tuple[str, str], object], eps: float = E8, **kw) -> pd.DataFrame:
    """M-sample records of (attack, gate_grad) -> robust mask (or a count: the first k samples are robust)."""
    return pd.concat([make_records(M, attack=a, gate_grad=g, eps=eps,
                                   adv_correct=np.arange(M) < robust if np.ndim(robust) == 0 else robust, **kw)
                      for (a, g), robust in spec.items()], ignore_index=True)


def test_none_stronger_than_bpda_is_a_poor_surrogate_not_masking():
    c = sanity.check_routing_gradients(paired({("pgd", "none"): 30, ("pgd", "bpda"): 40}))  # 10 of 64 differ
    assert c.status == "warn"
    assert "bpda is significantly weaker than 'none'" in c.evidence and "poor surrogate" in c.evidence
    assert "masked" not in c.evidence
    assert "b=0 robust only under none, c=10 only under bpda, McNemar p=0.002" in c.evidence
    assert "none gave the lowest robust accuracy (46.9%)" in c.evidence
    assert "per-sample worst case over routing gradients (46.9%" in c.evidence


def test_two_samples_of_64_are_not_a_difference():
    c = sanity.check_routing_gradients(paired({("pgd", "none"): 30, ("pgd", "bpda"): 28}))
    assert c.status == "pass" and "No routing gradient (bpda) differs significantly" in c.evidence
    assert "bpda gave the lowest robust accuracy (43.8%)" in c.evidence


def test_a_tie_for_the_lowest_names_every_tied_gradient():
    c = sanity.check_routing_gradients(paired({("pgd", "none"): 0, ("pgd", "bpda"): 0, ("pgd", "ste"): 20}))
    assert "ste is significantly weaker" in c.evidence
    assert "none/bpda (tied) gave the lowest robust accuracy (0.0%)" in c.evidence


def test_sharp_stronger_than_none_means_none_is_masked():
    c = sanity.check_routing_gradients(paired({("pgd", "none"): 40, ("pgd", "sharp"): 10}))
    assert c.status == "warn" and "sharp is significantly stronger than 'none'" in c.evidence
    assert "evaluation alone is masked" in c.evidence and "b=30" in c.evidence
    assert "sharp gave the lowest robust accuracy (15.6%)" in c.evidence


def test_both_directions_in_one_setting():
    c = sanity.check_routing_gradients(paired({("pgd", "none"): 30, ("pgd", "sharp"): 10, ("pgd", "bpda"): 45}))
    assert c.status == "warn" and "sharp is significantly stronger" in c.evidence
    assert "bpda is significantly weaker" in c.evidence
    assert len(c.details) == 1 and "sharp stronger" in c.details[0] and "bpda weaker" in c.details[0]


def test_pairing_decides_not_the_accuracy_gap():
    idx = np.arange(M)
    # both: none 30/64 vs bpda 24/64 (6 samples); concordant except 6 -> p = 0.031
    clean_gap = {("pgd", "none"): idx < 30, ("pgd", "bpda"): idx < 24}
    assert sanity.check_routing_gradients(paired(clean_gap)).status == "warn"
    # same gap from 8 vs 2 discordant samples -> p = 0.11: noise
    noisy = {("pgd", "none"): idx < 30, ("pgd", "bpda"): (idx < 22) | ((idx >= 30) & (idx < 32))}
    c = sanity.check_routing_gradients(paired(noisy))
    assert c.status == "pass", c.evidence


def test_thresholds_are_parameters():
    df = paired({("pgd", "none"): 30, ("pgd", "bpda"): 24})  # b=6, c=0, 9.4 points
    assert sanity.check_routing_gradients(df, min_samples=7).status == "pass"
    assert sanity.check_routing_gradients(df, min_points=0.1).status == "pass"
    assert sanity.check_routing_gradients(df, alpha=0.01).status == "pass"
    assert sanity.run_checks(df, min_samples=7)[4].status == "pass"


def test_minimal_and_unbounded_attacks_are_not_compared():
    huge = {("cw", "none"): 60, ("cw", "bpda"): 0}
    assert attack_kind("cw") == MINIMAL
    assert sanity.check_routing_gradients(paired(huge)).status == "skip"
    c = sanity.check_routing_gradients(pd.concat([paired(huge), paired({("pgd", "none"): 30, ("pgd", "bpda"): 30})]))
    assert c.status == "pass" and "cw" not in c.evidence and "1 setting" in c.evidence
    assert sanity.check_routing_gradients(paired({("pgd", "none"): 60, ("pgd", "bpda"): 0},
                                                 eps=float("inf"))).status == "skip"


def test_clean_wrong_samples_are_never_robust():
    idx = np.arange(M)
    clean = idx < 40
    # bpda "keeps" the 24 clean-wrong samples right: adv_correct differs by 24, robust does not
    spec = {("pgd", "none"): idx < 30, ("pgd", "bpda"): (idx < 30) | (idx >= 40)}
    df = paired(spec, clean_correct=clean)
    assert df.groupby("gate_grad")["adv_correct"].mean().nunique() == 2
    c = sanity.check_routing_gradients(df)
    assert c.status == "pass" and "(46.9%)" in c.evidence
    # the same rows as an eps curve: adv_correct rises with eps, robust accuracy does not
    curve = pd.concat([make_records(M, eps=E2, adv_correct=idx < 30, clean_correct=clean),
                       make_records(M, eps=E8, adv_correct=(idx < 30) | (idx >= 40), clean_correct=clean)])
    assert sanity.check_eps_monotone(curve).status == "pass"


def test_zero_gradient_share():
    assert sanity.check_zero_gradients(None).status == "skip"
    assert sanity.check_zero_gradients(0.002).status == "pass"
    warn = sanity.check_zero_gradients(0.2)
    assert warn.status == "warn" and "20.0%" in warn.evidence
    assert sanity.check_zero_gradients(pd.Series([0.0, 1.0, 2.0, 0.5])).status == "warn"  # norms: 25% zero
    assert sanity.check_zero_gradients(pd.Series([False] * 200)).status == "pass"


def test_transfer_beating_whitebox_warns():
    wb = make_records(N, run="runA", success=np.arange(N) < 50)
    weak = make_records(N, run="runA", attack="pgd", source_run="runB", success=np.arange(N) < 30)
    strong = make_records(N, run="runA", attack="pgd", source_run="runB", success=np.arange(N) < 120)
    assert sanity.check_transfer_vs_whitebox(pd.concat([wb, weak])).status == "pass"
    c = sanity.check_transfer_vs_whitebox(pd.concat([wb, strong]))
    assert c.status == "warn" and "runB->runA" in c.evidence


def test_checks_skip_without_data():
    empty = make_records(0)
    checks = sanity.run_checks(empty)
    assert [c.status for c in checks] == ["skip"] * len(checks)
    assert all(c.evidence for c in checks)


# --------------------------------------------------------------------------------------------- kinds decide

class PluginIterative(Attack):
    """A registered iterative attack no check names: the registry's kind alone must put it in its category."""

    name, backend, kind = "plugin-iter", "test", ITERATIVE


@pytest.fixture
def plugin_attack():
    register(PluginIterative)
    yield PluginIterative.name
    unregister(PluginIterative.name, PluginIterative.backend)


def test_categories_follow_registered_kinds(plugin_attack):
    spec = {(plugin_attack, "none", E8): 0.7, ("fgsm", "none", E8): 0.45}
    c = sanity.check_iterative_vs_single_step(curves(spec))
    assert c.status == "warn" and "plugin-iter 70.0% vs fgsm 45.0%" in c.evidence


def test_unregistered_names_have_no_kind_but_count_for_accuracy():
    assert attack_kind("old-attack") is None
    spec = {("old-attack", "none", E8): 0.7, ("fgsm", "none", E8): 0.45}
    assert sanity.check_iterative_vs_single_step(curves(spec)).status == "skip"  # not iterative
    c = sanity.check_unbounded(curves({("old-attack", "none", BIG): 0.3, ("pgd", "none", E8): 0.2}))
    assert c.status == "warn" and "old-attack/none leaves 30.0%" in c.evidence  # counted for accuracy
    c = sanity.check_square_vs_gradient(curves({("old-attack", "none", E8): 0.3, ("square", "none", E8): 0.05}))
    assert c.status == "warn" and "vs old-attack/none 30.0%" in c.evidence  # a gradient attack, not gradient-free


def test_compute_attacks_do_not_count_for_accuracy_but_path_does():
    assert attack_kind("slowdown") == COMPUTE and attack_kind("path") == ITERATIVE
    spec = {("slowdown", "none", BIG): 1.0, ("pgd", "none", BIG): 0.0, ("pgd", "none", E8): 0.2}
    assert sanity.check_unbounded(curves(spec)).status == "pass"  # slowdown leaves accuracy alone: not a failure
    c = sanity.check_unbounded(curves({("path", "none", BIG): 0.3, ("pgd", "none", E8): 0.2}))
    assert c.status == "warn" and "path/none leaves 30.0%" in c.evidence
    routed = curves({("path", "none", E8): 0.6, ("path", "bpda", E8): 0.2})
    c = sanity.check_routing_gradients(routed)
    assert c.status == "warn" and "path at eps=8/255 on runA" in c.evidence


def _cascaded(df: pd.DataFrame, attack: str, after: str) -> pd.DataFrame:
    """``df`` as the attack cascade writes it: ``attack``'s rows carry ``after``'s where ``after`` broke the sample."""
    df = df.copy()
    df["found_by"] = df["attack"]
    for (grad, eps), first in df[df["attack"] == after].groupby(["gate_grad", "eps"]):
        broken = set(first.loc[first["clean_correct"] & ~first["robust"], "sample"])
        rows = (df["attack"] == attack) & (df["gate_grad"] == grad) & (df["eps"] == eps) & df["sample"].isin(broken)
        df.loc[rows, ["adv_correct", "robust", "success", "found_by"]] = [False, False, True, after]
    return df


def test_an_iterative_attack_in_the_cascade_after_fgsm_is_not_compared_with_it():
    # under the cascade pgd holds fgsm's finds: "pgd >= fgsm" would pass whatever pgd does, so the check says so
    records = _cascaded(curves(with_(fgsm__none__E8=0.1)), "pgd", "fgsm")
    c = sanity.check_iterative_vs_single_step(records[records["gate_grad"] == "none"])
    assert c.status == "skip" and "cascade" in c.evidence
    # the same records without the cascade still warn
    assert sanity.check_iterative_vs_single_step(curves(with_(fgsm__none__E8=0.1))).status == "warn"


def test_square_in_the_cascade_is_not_called_powerful_for_following_the_gradient_attacks(honest):
    # a Square far too weak on its own (90% left): alone it is called too weak ...
    weak = curves(with_(square__none__E2=0.9, square__none__E8=0.9))
    assert sanity.check_square_vs_gradient(weak).status == "warn"
    # ... after pgd in the cascade its rows hold pgd's finds; its power is unmeasured, never claimed
    c = sanity.check_square_vs_gradient(_cascaded(weak, "square", "pgd"))
    assert "could have fired" not in c.evidence and "power is not measured" in c.evidence


def test_check_lines_give_linf_budgets_in_units_of_1_255_at_every_size():
    # 17.5/255 and 20.75/255 (an --eps auto grid on digits): quarter steps above 16/255 once read 0.06863
    spec = {("pgd", "none", 17.5 / 255): 0.3, ("pgd", "none", 20.75 / 255): 0.6,
            ("fgsm", "none", 17.5 / 255): 0.1}
    rising = sanity.check_eps_monotone(curves(spec))
    assert "at eps=20.75/255 vs 30.0% at eps=17.5/255" in rising.evidence
    weaker = sanity.check_iterative_vs_single_step(curves(spec))
    assert "at eps=17.5/255" in weaker.evidence and "0.0686" not in weaker.evidence


def test_figure_ticks_give_linf_budgets_in_units_of_1_255():
    from reports import plots

    frame = pd.DataFrame({"norm": ["linf"] * 2, "eps": [14.25 / 255, 20.75 / 255]})
    assert plots._labels(frame, frame["eps"]) == ["14.25/255", "20.75/255"]
    l2 = pd.DataFrame({"norm": ["l2"], "eps": [0.5]})
    assert plots._labels(l2, l2["eps"]) == ["0.5"]


def test_a_check_registered_from_a_plug_in_module_runs_and_unregisters(tmp_path, honest):
    import importlib.util

    (tmp_path / "plugin_check.py").write_text(
        "from robustness.sanity import Check, register_check\n\n\n"
        "@register_check('plugin-rows')\n"
        "def rows(inputs):\n"
        "    return Check('plugin-rows', 'pass', f'{len(inputs.df)} rows, tol={inputs.tol:g}.')\n")
    builtin = [c.name for c in sanity.run_checks(honest)]
    spec = importlib.util.spec_from_file_location("plugin_check", tmp_path / "plugin_check.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # registers on import
        checks = sanity.run_checks(honest, tol=0.02)
        # without an order it runs after every built-in check, which keep their order and results
        assert [c.name for c in checks] == [*builtin, "plugin-rows"]
        assert checks[-1] == sanity.Check("plugin-rows", "pass", f"{len(honest)} rows, tol=0.02.")
        with pytest.raises(ValueError, match="already registered"):
            sanity.register_check("plugin-rows")(module.rows)
    finally:
        sanity.unregister_check("plugin-rows")
    assert "plugin-rows" not in [c.name for c in sanity.registered_checks()]
    assert [c.name for c in sanity.run_checks(honest)] == builtin
