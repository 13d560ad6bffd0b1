"""A run's analysis is computed once (robustness.findings.run): the report, the API's Results, the comparison and
`dsn-robust attack`'s closing table of one run read one RunAnalysis in a process, so the sanity checks, the
minimal distances and the worst case run once per run; a run that grows is analysed again; and every consumer
shows the same numbers."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import robustness.findings.headline as headline_module
import robustness.findings.run as run_module
import robustness.sanity.curve_vs_fixed as curve_check
from attacks.runner import AttackResult
from robustness.app import api
from robustness.findings.run import analyse
from robustness.app.commands.attack import summary_table
from robustness.core.runtime import jsonable
from robustness.core.vocab import format_distance
from robustness.results import RunResults, load_run
from test_analysis import make_records
from test_reports import N, attacked, write_run


def run_records(name: str, model: str, n_gates: int, *, modes=("hard",), scale: float = 1.0,
                attacks=("fgsm", "pgd")) -> pd.DataFrame:
    """Fixed-eps records (test_reports.attacked) and a minimal attack's distances per gate mode, ``scale`` times
    a seeded draw (a larger scale: a more robust model)."""
    parts = []
    for i, mode in enumerate(modes):
        parts.append(attacked(name, model, n_gates, gate_mode=mode, attacks=attacks))
        correct = np.arange(N) % 10 != 0
        minimal = make_records(N, run=name, model=model, attack="pgd-bisect", backend="native", eps=np.inf,
                               gate_mode=mode, n_gates=n_gates, clean_correct=correct, success=correct)
        minimal["linf"] = np.random.default_rng(i).uniform(1, 8, N) / 255 * scale
        parts.append(minimal)
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analysed")
    return {"dsn": write_run(root, run_records("dsn", "dsn", 4, modes=("hard", "open"))),
            "dual": write_run(root, run_records("dual", "dual", 0, scale=1.2), gated=False)}


def spy(monkeypatch, module, name: str, counts: Counter, label: str | None = None) -> None:
    """Count the calls of ``module.name`` (``label``; ``minimal_distances`` per ``by_grad``)."""
    original = getattr(module, name)

    def counted(*args, **kwargs):
        key = label or name
        counts[f"{key} by_grad" if kwargs.get("by_grad") else key] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)


def test_report_results_and_compare_of_the_same_runs_analyse_each_once(two_runs, tmp_path, monkeypatch):
    counts: Counter = Counter()
    for name in ("_analyse", "run_checks", "minimal_distances", "worst_case_accuracy"):
        spy(monkeypatch, run_module, name, counts)
    # the computations the analysis replaced must not run on their own any more
    spy(monkeypatch, curve_check, "minimal_distances", counts, "sanity's own minimal_distances")
    spy(monkeypatch, headline_module, "minimal_distances", counts, "headline's own minimal_distances")
    spy(monkeypatch, headline_module, "worst_case_accuracy", counts, "headline's own worst_case_accuracy")

    results = {name: api.load_run(path, n_boot=200) for name, path in two_runs.items()}
    indexes = {name: res.write_report(tmp_path / name) for name, res in results.items()}
    checks = {name: res.checks for name, res in results.items()}
    heads = {name: res.headline for name, res in results.items()}
    comparison = api.compare(results["dsn"], results["dual"], n_boot=200)

    assert counts == {"_analyse": 2, "run_checks": 2, "minimal_distances": 2, "minimal_distances by_grad": 2,
                      "worst_case_accuracy": 2}
    for name, res in results.items():
        assert res.analysis is analyse(res.run)  # the cache hands the same analysis back
        payload = json.loads((indexes[name].parent / "summary.json").read_text())
        assert [c.as_dict() for c in checks[name]] == [c.as_dict() for c in comparison.sanity[name]]
        assert [(c.name, c.status, c.evidence) for c in checks[name]] == \
            [(c["name"], c["status"], c["evidence"]) for c in payload["sanity"]]
        assert payload["headline"] == json.loads(json.dumps(jsonable(heads[name].as_dict())))
        worst = res.analysis.worst_case
        eps = worst["eps"].astype(float)
        hard = worst[(worst["gate_mode"] == "hard") & (eps > 0) & np.isfinite(eps)].sort_values("eps")
        assert res.robust_accuracy["estimate"].tolist() == pytest.approx(hard["robust_acc"].tolist())
        assert [r["robust_acc"] for r in payload["worst_case"]] == pytest.approx(worst["robust_acc"].tolist())
    # the comparison's distances are the run analysis's, split by gate mode
    dsn_hard = next(v for v in comparison.variants if v.label == "dsn(hard)")
    own = results["dsn"].analysis.minimal
    assert dsn_hard.minimal.equals(own[own["gate_mode"] == "hard"].reset_index(drop=True))
    assert len(dsn_hard.minimal) == N


def test_the_attack_summary_reads_the_same_distances_as_the_headline(two_runs):
    run = load_run(two_runs["dsn"])
    table = summary_table(AttackResult(run.path, run.manifest, run.records))
    median = analyse(run).headline(n_boot=0).distances[0]
    line = next(s for s in table.splitlines() if "minimum over routing gradients" in s)
    assert f": {format_distance(median.median.estimate, 'linf')} " in line
    assert f"({median.found} of {median.clean_correct} clean-correct samples fooled)" in line


def test_a_grown_run_is_analysed_again(tmp_path):
    # minimal distances beyond every budget (10-80/255): only the fixed-eps attacks decide the worst case
    run_dir = write_run(tmp_path, run_records("dsn", "dsn", 4, attacks=("fgsm",), scale=10))
    before = load_run(run_dir)
    first = analyse(before)
    assert analyse(before) is first
    fgsm_only = first.worst_case.set_index("eps")["robust_acc"]

    write_run(tmp_path, run_records("dsn", "dsn", 4, attacks=("fgsm", "pgd"), scale=10))  # a stronger attack joins
    grown = analyse(load_run(run_dir))
    assert grown is not first
    assert set(grown.worst_case.loc[grown.worst_case["eps"] == 8 / 255, "attacks"]) == {"fgsm,pgd"}
    with_pgd = grown.worst_case.set_index("eps")["robust_acc"]
    assert (with_pgd[8 / 255] < fgsm_only[8 / 255]) and with_pgd[0.0] == fgsm_only[0.0]
    # the records on disk changed under the first results: they are analysed again too (of their own records)
    again = analyse(before)
    assert again is not first and again.worst_case.equals(first.worst_case)


def test_results_in_memory_with_other_records_are_never_confused(tmp_path):
    nowhere = tmp_path / "never-written" / "dsn"
    weak = RunResults(nowhere, "dsn", run_records("dsn", "dsn", 4, attacks=("fgsm",)))
    strong = RunResults(nowhere, "dsn", run_records("dsn", "dsn", 4, attacks=("fgsm", "pgd")))
    a, b = analyse(weak), analyse(strong)
    assert a is not b and a.run is weak and b.run is strong
    fixed = lambda w: set(w.loc[np.isfinite(w["eps"].astype(float)), "attacks"])  # noqa: E731
    assert fixed(a.worst_case) == {"fgsm"} and fixed(b.worst_case) == {"fgsm,pgd"}
    assert analyse(weak, zero_grad_share=0.5) is not a  # another measurement is another analysis
    zero = {c.name: c for c in analyse(weak, zero_grad_share=0.5).checks}["zero-input-gradient"]
    assert zero.status == "warn" and {c.name: c for c in a.checks}["zero-input-gradient"].status == "skip"
