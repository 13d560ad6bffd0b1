"""A run's headline, the attack x eps pivot, the compute attacks' table and the figures' attack family, on
constructed records with known answers; and that the per-model page shows exactly the headline summary.json holds."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports import plots
from reports.run_page import write_report
from reports.tables import headline_table
from robustness import analysis
from robustness.findings.headline import NO_GATES, run_headline
from robustness.core.runtime import jsonable
from robustness.results import RunResults, load_run
from robustness.sanity import Check
from test_analysis import BASE_MACS, BLOCK_MACS, full_macs, make_records
from test_reports import EPS, N, attacked, write_run

# distance of sample i, found for every sample but the last 10
MINIMAL = {"l2": np.linspace(0.05, 1.25, N), "linf": (np.arange(N) % 12 + 1) / 255 / 2}


def minimal_records(norm: str = "l2", gate_grad: str = "none", scale: float = 1.0) -> pd.DataFrame:
    """Rows of a minimal-norm attack (ddn for L2, pgd-bisect for L-inf; eps = inf) of run dsn1 whose distances are
    ``scale * MINIMAL[norm]``."""
    attack, backend = ("ddn", "foolbox") if norm == "l2" else ("pgd-bisect", "native")
    rec = make_records(N, run="dsn1", model="dsn", attack=attack, backend=backend, norm=norm, eps=float("inf"),
                       gate_grad=gate_grad, clean_correct=np.arange(N) % 10 != 0, success=np.arange(N) < N - 10)
    rec[norm] = scale * MINIMAL[norm]
    return rec


def loaded(records: pd.DataFrame, gated: bool = True) -> RunResults:
    manifest = {"dataset": {"name": "synthetic"}, "seed": 0, "n": N, "full_macs": full_macs(4 if gated else 0),
                "model": str(records["model"].iloc[0])}
    return RunResults(Path("/nonexistent") / str(records["run"].iloc[0]), str(records["run"].iloc[0]), records,
                      manifest)


PASSING = [Check("eps-monotone", "pass", "fine"), Check("transfer-vs-whitebox", "skip", "none")]


@pytest.fixture(scope="module")
def gated_records() -> pd.DataFrame:
    return pd.concat([attacked("dsn1", "dsn", 4, attacks=("fgsm", "pgd", "slowdown"), gate_grads=("none", "bpda")),
                      attacked("dsn1", "dsn", 4, gate_mode="open", seed=1), minimal_records(),
                      minimal_records(gate_grad="bpda", scale=0.8), minimal_records("linf")], ignore_index=True)


# --------------------------------------------------------------------------------------------- the headline

def test_headline_numbers_are_the_deployed_worst_case(gated_records):
    h = run_headline(loaded(gated_records), PASSING, n_boot=200)
    assert (h.gate_mode, h.target, h.gated) == ("hard", "fine", True)
    assert h.clean.estimate == pytest.approx(0.9) and h.clean.n == N and h.clean.low < 0.9 < h.clean.high
    assert [r.eps for r in h.robust] == pytest.approx([e for e in EPS if e > 0])  # linf grid, no eps 0 or inf
    hard = gated_records[(gated_records["gate_mode"] == "hard") & np.isfinite(gated_records["eps"])]
    minimal = gated_records[(gated_records["gate_mode"] == "hard") & np.isinf(gated_records["eps"])
                            & (gated_records["norm"] == "linf") & gated_records["success"]]
    discriminating = {"minimal": False, "slowdown": False}  # the test can fail: each rule changes some number
    for r in h.robust:
        at = hard[hard["eps"] == r.eps]
        within = list(set(minimal.loc[minimal["linf"] <= r.eps, "sample"]))  # a minimal example inside the budget
        accuracy = at[at["attack"].isin(["fgsm", "pgd"])]
        fixed = accuracy.groupby("sample")["robust"].all()
        expected = (fixed & ~fixed.index.isin(within)).mean()
        with_slowdown = (at.groupby("sample")["robust"].all() & ~fixed.index.isin(within)).mean()
        discriminating["minimal"] |= bool(expected < fixed.mean())
        discriminating["slowdown"] |= bool(with_slowdown < expected)
        assert r.accuracy.estimate == pytest.approx(expected) and r.accuracy.n == N
        assert r.accuracy.low <= expected <= r.accuracy.high
        assert "slowdown" not in r.attacks.split(",")
        assert r.within_budget == ("pgd-bisect" if within else "")
    assert all(discriminating.values()), discriminating
    # the headline names the minimal attack whose examples broke samples at a fixed eps
    details = [row["detail"] for row in headline_table(h) if row["label"].startswith("Robust accuracy")]
    assert any("the examples of pgd-bisect within eps" in d for d in details)


def test_headline_median_distance_is_the_minimum_over_routing_gradients(gated_records):
    h = run_headline(loaded(gated_records), PASSING, n_boot=200)
    d = {m.norm: m for m in h.distances}
    assert set(d) == {"linf", "l2"}
    correct, found = np.arange(N) % 10 != 0, np.arange(N) < N - 10
    eps = gated_records["eps"].to_numpy(float)
    fixed = gated_records[(gated_records["gate_mode"] == "hard") & np.isfinite(eps) & (eps > 0)
                          & gated_records["attack"].isin(["fgsm", "pgd"]) & gated_records["success"]]
    for norm, scale in (("l2", 0.8), ("linf", 1.0)):  # bpda's L2 distances are smaller than none's
        dist = np.where(found, scale * MINIMAL[norm], np.inf)
        # a fixed-eps success of the same norm caps the distance (the fixture's budgets are all L-inf)
        capped = fixed[fixed["norm"] == norm].groupby("sample")[norm].min().reindex(range(N), fill_value=np.inf)
        dist = np.minimum(dist, capped.to_numpy(float))[correct]
        m = d[norm]
        assert m.median.estimate == pytest.approx(np.median(dist))
        assert m.median.low <= m.median.estimate <= m.median.high
        assert (m.clean_correct, m.found) == (correct.sum(), np.isfinite(dist).sum())
    no_linf = run_headline(loaded(gated_records[gated_records["attack"] != "pgd-bisect"]), PASSING, n_boot=50)
    linf = next(m for m in no_linf.distances if m.norm == "linf")
    assert linf.median is None and "no minimal-norm attack in linf" in linf.reason


def test_headline_compute_and_masking():
    warn = [Check("routing-gradient", "warn", "bpda beats none"), Check("zero-input-gradient", "warn", "many"),
            Check("eps-monotone", "pass", "fine")]
    gated = attacked("dsn1", "dsn", 4)
    h = run_headline(loaded(gated), warn, n_boot=50)
    clean_macs = BASE_MACS + BLOCK_MACS * 3  # every clean path executes 3 of 4 blocks
    assert h.compute_saved == pytest.approx(1 - clean_macs / full_macs(4)) and h.compute_reason == ""
    assert h.masking == "warn" and h.masking_warnings == ("routing-gradient", "zero-input-gradient")
    h = run_headline(loaded(attacked("resnet1", "resnet", 0), gated=False), PASSING, n_boot=50)
    assert np.isnan(h.compute_saved) and h.compute_reason == NO_GATES and not h.gated
    assert h.gate_mode == "hard" and h.masking == "pass" and h.masking_warnings == ()
    assert (h.masking_ran, h.masking_total) == (1, 2)
    masking_row = {r["label"]: r["detail"] for r in headline_table(h)}["Gradient masking checks"]
    assert masking_row == "no check warns (1 of 2 ran)"
    mostly_skipped = run_headline(loaded(attacked("resnet1", "resnet", 0), gated=False),
                                  PASSING + [Check("square-vs-gradient", "skip", "no square")], n_boot=50)
    masking_row = {r["label"]: r["detail"] for r in headline_table(mostly_skipped)}["Gradient masking checks"]
    assert "1 of 3 could run" in masking_row and "weak evidence" in masking_row  # a PASS that says how little ran
    assert all(m.median is None and "no minimal-norm attack in this run" in m.reason for m in h.distances)
    payload = jsonable(h.as_dict())
    assert payload["compute_saved"] is None and payload["median_distance"][0]["estimate"] is None
    assert payload["compute_reason"] == NO_GATES and json.dumps(payload, allow_nan=False)


# --------------------------------------------------------------------------------------------- pivot, compute

def test_pivot_takes_the_strongest_routing_gradient_per_sample_and_never_a_compute_attack():
    eps = 8 / 255
    none_fails = np.arange(N) % 3 == 0   # 'none' breaks one sample in three
    bpda_fails = np.arange(N) % 3 == 1   # 'bpda' breaks other samples
    rows = [make_records(N, attack="pgd", eps=eps, gate_grad="none", success=none_fails),
            make_records(N, attack="pgd", eps=eps, gate_grad="bpda", success=bpda_fails),
            make_records(N, attack="fgsm", eps=eps, success=np.arange(N) % 2 == 0),
            make_records(N, attack="pgd", eps=0.5, norm="l2", success=np.arange(N) < 30),
            make_records(N, attack="slowdown", eps=eps, success=np.arange(N) < N),
            make_records(N, attack="pgd", eps=eps, gate_mode="open", success=np.arange(N) < N)]
    pivot = analysis.accuracy_pivot(pd.concat(rows, ignore_index=True))
    cell = pivot.set_index(["attack", "norm", "eps"])["robust_acc"]
    assert set(pivot["attack"]) == {"pgd", "fgsm", analysis.WORST_ROW}
    assert cell[("pgd", "linf", eps)] == pytest.approx(1 / 3)  # neither gradient alone gets there
    assert cell[("fgsm", "linf", eps)] == pytest.approx(0.5)
    assert cell[(analysis.WORST_ROW, "linf", eps)] == pytest.approx(np.mean(~(none_fails | bpda_fails |
                                                                              (np.arange(N) % 2 == 0))))
    assert cell[("pgd", "l2", 0.5)] == pytest.approx(1 - 30 / N)  # open mode (every sample broken) not pooled


def test_compute_attack_table_is_the_share_of_saved_compute_taken_back():
    eps = 8 / 255
    clean = np.where(np.arange(N) % 2 == 0, "1000", "1100")   # 1.5 of 4 blocks on average
    rows = [make_records(N, attack="slowdown", eps=eps, gate_grad="none", clean_path=clean, adv_path="1110"),
            make_records(N, attack="slowdown", eps=eps, gate_grad="bpda", clean_path=clean,
                         adv_path=np.where(np.arange(N) < 10, "1111", clean)),
            make_records(N, attack="pgd", eps=eps, clean_path=clean, adv_path="1111")]
    table = analysis.compute_attack_table(pd.concat(rows, ignore_index=True), full_macs(4))
    assert table["attack"].tolist() == ["slowdown"]
    row = table.iloc[0]
    adv_blocks = np.where(np.arange(N) < 10, 4, 3)  # per sample the most over routing gradients
    assert row["clean_macs"] == pytest.approx(BASE_MACS + 1.5 * BLOCK_MACS)
    assert row["adv_macs"] == pytest.approx(BASE_MACS + BLOCK_MACS * adv_blocks.mean())
    assert row["taken_back"] == pytest.approx((adv_blocks.mean() - 1.5) / (4 - 1.5))
    none_saved = analysis.compute_attack_table(make_records(N, attack="slowdown", eps=eps), full_macs(4))
    assert np.isnan(none_saved["taken_back"].iloc[0])  # every block already runs: nothing to take back


def test_primary_evaluation_prefers_the_deployed_hard_forward():
    rows = [make_records(N, attack="pgd", eps=e, gate_mode="hard", success=np.arange(N) < 20,
                         clean_path="1010", adv_path=np.where(np.arange(N) < 20, "0110", "1010"))
            for e in (2 / 255, 8 / 255)]
    # open: every block runs, much weaker model and more eps -- the old ranking picked it
    rows += [make_records(N, attack="apgd-ce", eps=e, gate_mode="open", success=np.arange(N) < 90)
             for e in (1 / 255, 2 / 255, 8 / 255)]
    rows += [make_records(N, attack="fgsm", eps=e, gate_mode="hard", success=np.arange(N) < 10, clean_path="1010")
             for e in (2 / 255, 8 / 255)]
    rows += [make_records(N, attack="ddn", backend="foolbox", norm="l2", eps=e, success=np.arange(N) < N)
             for e in (1.0, float("inf"))]  # weaker with as many eps if eps = inf counted (it does not)
    records = pd.concat(rows, ignore_index=True)
    fam = analysis.primary_evaluation(records)
    assert (fam["gate_mode"], fam["attack"]) == ("hard", "pgd")
    assert analysis.primary_evaluation(records[records["gate_mode"] == "open"])["gate_mode"] == "open"


def test_report_gate_figures_come_from_hard_records(tmp_path):
    hard = attacked("dsn1", "dsn", 4, gate_grads=("none",))
    open_ = attacked("dsn1", "dsn", 4, gate_mode="open", robust_bonus=-0.5, attacks=("fgsm", "pgd"))
    report = write_report(load_run(write_run(tmp_path, pd.concat([hard, open_], ignore_index=True))), n_boot=50)
    captions = {f.name: f.caption for f in report.figures}
    for name in ("flip_heatmap", "hamming_by_success", "success_by_path_change"):
        assert "hard gates" in captions[name] and "open gates" not in captions[name]


# --------------------------------------------------------------------------------------------- the page

HEADLINE_TABLE = re.compile(r'<table class="headline" id="headline">(.*?)</table>', re.S)
ROW = re.compile(r"<tr><th>(.*?)</th><td class=\"value\">(.*?)</td><td class=\"detail\">(.*?)</td></tr>", re.S)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _numbers(text: str) -> list[float]:
    return [float(x) for x in NUMBER.findall(text)]


@pytest.fixture(scope="module")
def page(tmp_path_factory, gated_records) -> tuple[dict, dict[str, str], str]:
    run_dir = write_run(tmp_path_factory.mktemp("headline"), gated_records)
    out = write_report(load_run(run_dir), n_boot=200).out
    html = (out / "index.html").read_text()
    rows = {label: value for label, value, _ in ROW.findall(HEADLINE_TABLE.search(html).group(1))}
    return json.loads((out / "summary.json").read_text())["headline"], rows, html


def test_headline_in_html_equals_summary_json(page):
    head, rows, _ = page

    def percent_with_interval(value: str, iv: dict) -> None:
        assert _numbers(value) == pytest.approx([round(100 * iv[k], 1) for k in ("estimate", "low", "high")],
                                                abs=0.051)

    percent_with_interval(rows["Clean accuracy"], head["clean_acc"])
    assert len(head["robust_acc"]) == 2
    for r in head["robust_acc"]:
        label = f"Robust accuracy at L∞ eps = {round(r['eps'] * 255)}/255"
        percent_with_interval(rows[label], r)
    distance = {d["norm"]: d for d in head["median_distance"]}
    assert _numbers(rows["Median minimal L2 distance"]) == pytest.approx(
        [distance["l2"][k] for k in ("estimate", "low", "high")], rel=0.006)
    linf = _numbers(rows["Median minimal L∞ distance"])  # k/255 each
    assert linf[1::2] == [255] * 3
    assert [x / 255 for x in linf[::2]] == pytest.approx([distance["linf"][k] for k in ("estimate", "low", "high")],
                                                         rel=0.006)
    assert _numbers(rows["Compute saved"]) == pytest.approx([round(100 * head["compute_saved"], 1)])
    assert rows["Gradient masking checks"] == head["masking"]["status"].upper()


def test_page_order_headline_pivot_checks_figures_compute_appendix(page):
    _, _, html = page
    order = ['id="headline"', "Robust accuracy per attack and eps", "Sanity checks", "<img",
             "<h2>Compute</h2>", "<h2>Appendix</h2>", "Summary per evaluation"]
    positions = [html.index(marker) for marker in order]
    assert positions == sorted(positions)
    appendix = html[html.index("<h2>Appendix</h2>"):]
    assert "<details>" in appendix.split("Summary per evaluation", 1)[1][:400], "the long table is collapsed"
    pivot = html[html.index("Robust accuracy per attack and eps"):html.index("Sanity checks")]
    assert "slowdown" not in pivot and "<td>worst case</td>" in pivot and "<th>8/255</th>" in pivot
    compute = html[html.index("<h2>Compute</h2>"):html.index("<h2>Details</h2>")]
    assert "slowdown" in compute and "Saved compute taken back" in compute and "<img" in compute


def test_accuracy_figure_and_pivot_leave_out_compute_attacks(gated_records):
    from reports.run_page import _accuracy_curves
    curves = _accuracy_curves(gated_records)
    assert "slowdown" not in set(curves["attack"]) and {"fgsm", "pgd", "worst"} <= set(curves["attack"])
    assert "slowdown" not in set(analysis.accuracy_pivot(gated_records)["attack"])


# --------------------------------------------------------------------------------------------- figures

def test_scatter_labels_never_overlap():
    points = pd.DataFrame({"variant": [f"variant-{k}" for k in range(5)],
                           "compute_saved": [0.200, 0.201, 0.199, 0.2005, 0.2],
                           "robust_acc": [0.500, 0.502, 0.499, 0.501, 0.5005]})
    fig = plots._compute_vs_robust_figure(points)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in fig.axes[0].texts if t.get_gid() == "point-label"]
    assert sorted(t.get_text() for t in labels) == sorted(points["variant"])
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            overlap = a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1
            assert not overlap, f"labels {labels[i].get_text()} and {labels[j].get_text()} overlap"
    # the column keeps the points' vertical order: the highest point's label is on top
    top = max(labels, key=lambda t: t.get_window_extent(renderer).y0)
    assert top.get_text() == points.loc[points["robust_acc"].idxmax(), "variant"]
    assert plots.plot_compute_vs_robust(points).startswith(plots.PNG_MAGIC)


def test_training_curves_need_metrics():
    metrics = pd.DataFrame({"epoch": [1, 2], "test_acc_fine": [0.3, 0.5], "skip_coarse": [0.0, 0.3],
                            "skip_fine": [0.0, 0.1], "macs_saved": [0.0, 0.2]})
    assert plots.plot_training_curves(metrics).startswith(plots.PNG_MAGIC)
    assert plots.plot_training_curves(None) is None
    assert plots.plot_training_curves(pd.DataFrame({"epoch": [1], "lr": [0.1]})) is None


def test_transfer_heatmap_needs_transfer_rows():
    wb = make_records(N, run="dsn", attack="pgd", success=np.arange(N) < 60)
    tr = make_records(N, run="dsn", attack="pgd", source_run="dual", success=np.arange(N) < 20)
    matrix = analysis.transfer_matrix(pd.concat([wb, tr], ignore_index=True))
    assert plots.plot_transfer_heatmap(matrix).startswith(plots.PNG_MAGIC)
    assert plots.plot_transfer_heatmap(analysis.transfer_matrix(wb)) is None
