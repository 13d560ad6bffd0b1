"""Gradient-masking checks: each passes on honest records and warns on records built to violate it."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attacks.base import COMPUTE, ITERATIVE, Attack, attack_kind, register, unregister
from robustness import sanity
from test_analysis import make_records

N = 200
E2, E8, BIG = 2 / 255, 8 / 255, 0.5


def curves(spec: dict[tuple[str, str, float], float], run: str = "runA", **kw) -> pd.DataFrame:
    """Records where (attack, gate_grad, eps) leaves the given robust accuracy (first samples stay correct)."""
    return pd.concat([make_records(N, run=run, attack=a, gate_grad=g, eps=e, adv_correct=np.arange(N) < round(acc * N),
                                   **kw)
                      for (a, g, e), acc in spec.items()], ignore_index=True)


HONEST = {
    ("pgd", "none", 0.0): 0.9, ("pgd", "none", E2): 0.6, ("pgd", "none", E8): 0.25, ("pgd", "none", BIG): 0.0,
    ("pgd", "bpda", E2): 0.59, ("pgd", "bpda", E8): 0.24,
    ("fgsm", "none", E2): 0.7, ("fgsm", "none", E8): 0.45,
    ("square", "none", E2): 0.66, ("square", "none", E8): 0.3,
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
    assert sanity.check_square_vs_gradient(curves({("pgd", "none", E8): 0.2})).status == "skip"


def test_bpda_beating_none_warns():
    c = sanity.check_routing_gradients(curves(with_(pgd__bpda__E8=0.05)))  # 20 points below 'none'
    assert c.status == "warn" and "masked" in c.evidence and "BPDA/STE" in c.evidence
    assert sanity.check_routing_gradients(curves({("pgd", "none", E8): 0.2})).status == "skip"


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
    assert c.status == "warn" and "path at eps=8/255" in c.evidence
