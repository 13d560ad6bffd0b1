"""End-to-end reports on tiny constructed run directories (records parquet + manifest + metrics)."""
from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from reports import tables
from reports.compare_page import write_comparison
from reports.run_page import write_report
from robustness.findings.compare import Comparison, compare_runs
from robustness.core.errors import RunDirError
from robustness.core.runtime import jsonable
from robustness.core.vocab import format_eps
from robustness.results import RunResults, load_run
from robustness.sanity import run_checks
from test_analysis import full_macs, make_records

N = 120
EPS = [0.0, 2 / 255, 8 / 255]
PATH_NAMES = ["coarse.s2.b1", "coarse.s3.b1", "fine.s2.b1", "fine.s3.b1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def attacked(run: str, model: str, n_gates: int, *, attacks=("fgsm", "pgd"), gate_grads=("none",),
             gate_mode: str = "hard", robust_bonus: float = 0.0, seed: int = 0) -> pd.DataFrame:
    """Records whose outcome depends only on (attack, eps, sample) and ``seed`` (so two runs built alike agree);
    gated runs change path more often where the attack succeeds, the slowdown attack executes every block."""
    frames = []
    for attack in attacks:
        for grad in gate_grads:
            for eps in EPS:
                rng = np.random.default_rng([seed, attacks.index(attack), int(eps * 255)])
                strength = {"fgsm": 0.6, "pgd": 1.0, "slowdown": 0.2}[attack] * eps * 255 / 8
                success = rng.random(N) < max(0.0, 0.7 * strength - robust_bonus)
                kw = {}
                if n_gates:
                    changed = np.where(success, rng.random(N) < 0.8, rng.random(N) < 0.2)
                    clean = np.where(np.arange(N) % 3 == 0, "1011", "1101") if gate_mode != "open" else "1111"
                    adv = np.where(changed, "1111" if attack == "slowdown" else "0101", clean)
                    if eps == 0 or gate_mode == "open":
                        adv = clean
                    kw = dict(clean_path=clean, adv_path=adv, frozen_correct=~success | (np.arange(N) % 4 == 0))
                frames.append(make_records(N, run=run, model=model, attack=attack, gate_grad=grad, eps=eps,
                                           gate_mode=gate_mode, n_gates=n_gates, success=success & (eps > 0),
                                           clean_correct=np.arange(N) % 10 != 0, **kw))
    return pd.concat(frames, ignore_index=True)


def compare_dirs(run_dirs: list[Path], labels: list[str] | None = None, n_boot: int = 1000) -> Comparison:
    """Load each run once and compare them (what ``dsn-robust compare`` does)."""
    return compare_runs([load_run(d) for d in run_dirs], labels, n_boot=n_boot)


def write_run(root: Path, records: pd.DataFrame, *, gated: bool = True, metrics: bool = True) -> Path:
    """A run directory with records shards, an attacks manifest and a training curve."""
    name = str(records["run"].iloc[0])
    run_dir = root / name
    evaluations = []
    keys = ["attack", "backend", "norm", "gate_mode", "gate_grad", "target", "source_run"]
    for key, g in records.groupby(keys, observed=True):
        meta = dict(zip(keys, key))
        eid = "-".join(str(v) for v in key if v)
        shard = run_dir / "attacks" / "records" / eid / "shard-00000.parquet"
        shard.parent.mkdir(parents=True, exist_ok=True)
        g.to_parquet(shard)
        evaluations.append({"id": eid, **meta, "eps": sorted(g["eps"].unique().tolist()),
                            "config": {"steps": 10, "random_start": True}, "complete": True})
    manifest = {"schema": "dsn-robustness/attacks/v1", "run": name, "model": str(records["model"].iloc[0]),
                "dataset": {"name": "synthetic", "fine_to_coarse": [c // 5 for c in range(10)]}, "seed": 0, "n": N,
                "versions": {"dsn-robustness": "0.1.0", "torch": "2.x", "torchattacks": "3.5.1"},
                "path_names": PATH_NAMES if gated else [], "full_macs": full_macs(4 if gated else 0),
                "evaluations": evaluations}
    (run_dir / "attacks" / "manifest.json").write_text(json.dumps(manifest))
    if metrics:
        pd.DataFrame({"epoch": [0, 1], "loss": [2.0, 1.5], "train_acc_fine": [0.3, 0.5], "test_acc_fine": [0.3, 0.45],
                      "test_acc_coarse": [0.5, 0.6], "skip_coarse": [0.0, 0.3], "skip_fine": [0.0, 0.2],
                      "macs_mean": [6e6, 5e6], "macs_saved": [0.0, 0.17], "lr": [0.1, 0.1], "seconds": [1.0, 1.0]}
                     ).to_csv(run_dir / "metrics.csv", index=False)
    return run_dir


class TagCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str], int]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs), self.getpos()[0]))


def parse(html: str) -> TagCollector:
    p = TagCollector()
    p.feed(html)
    p.close()
    return p


def assert_self_contained(html: str) -> list[dict[str, str]]:
    """No external references of any kind; returns the <img> attributes."""
    tags = parse(html).tags
    for tag, attrs, _ in tags:
        for attr in ("src", "href", "data", "poster", "action"):
            if attr in attrs:
                assert attrs[attr].startswith("data:"), f"<{tag} {attr}={attrs[attr][:40]!r}> points outside the file"
        assert tag not in ("link", "script", "iframe", "object", "embed"), f"<{tag}> in a self-contained report"
    assert "url(" not in html and "@import" not in html
    imgs = [a for t, a, _ in tags if t == "img"]
    for a in imgs:
        assert a["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(a["src"].split(",", 1)[1]).startswith(PNG_MAGIC)
    return imgs


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    records = pd.concat([attacked("dsn1", "dsn", 4, attacks=("fgsm", "pgd", "slowdown"), gate_grads=("none", "bpda")),
                         attacked("dsn1", "dsn", 4, gate_mode="open")], ignore_index=True)
    return write_run(root, records)


@pytest.fixture(scope="module")
def gated_report(gated_run) -> Path:
    return write_report(load_run(gated_run), n_boot=200).out


def test_report_writes_all_files(gated_run, gated_report):
    assert gated_report == gated_run / "report"
    for name in ("index.html", "report.md", "summary.csv", "summary.json"):
        assert (gated_report / name).is_file() and (gated_report / name).stat().st_size > 0
    assert not list(gated_report.rglob("*.tmp")), "temporary files left behind"


def test_report_html_is_self_contained_with_one_img_per_figure(gated_report):
    html = (gated_report / "index.html").read_text()
    imgs = assert_self_contained(html)
    payload = json.loads((gated_report / "summary.json").read_text())
    produced = [f for f in payload["figures"].values() if f]
    assert len(produced) == 7  # gated run with a slowdown attack and metrics.csv: every figure applies
    assert {"training_curves", "compute_attacks"} <= {k for k, v in payload["figures"].items() if v}
    assert len(imgs) == len(produced) == len(list((gated_report / "figures").glob("*.png")))


def test_report_markdown_references_figure_files(gated_report):
    md = (gated_report / "report.md").read_text()
    payload = json.loads((gated_report / "summary.json").read_text())
    for rel in filter(None, payload["figures"].values()):
        assert f"]({rel})" in md
        assert (gated_report / rel).read_bytes().startswith(PNG_MAGIC)
    assert "| Attack |" in md and "data:image" not in md


def test_sanity_verdicts_come_first(gated_report):
    html = (gated_report / "index.html").read_text()
    first_img = html.index("<img")
    assert html.index("Sanity checks") < first_img
    for name in ("eps-monotone", "routing-gradient", "square-vs-gradient"):
        assert html.index(name) < first_img
    md = (gated_report / "report.md").read_text()
    assert md.index("Sanity checks") < md.index("![")


def test_summary_json_schema_and_content(gated_report):
    payload = json.loads((gated_report / "summary.json").read_text())
    assert payload["schema"] == "dsn-robustness/report/v1"
    assert payload["eps"] == pytest.approx(EPS)
    assert payload["run"] == "dsn1" and payload["model"] == "dsn" and payload["seed"] == 0 and payload["n"] == N
    assert payload["versions"]["torchattacks"] == "3.5.1"
    assert {e["attack"] for e in payload["evaluations"]} == {"fgsm", "pgd", "slowdown"}
    assert {c["status"] for c in payload["sanity"]} <= {"pass", "warn", "skip"}
    assert [c["name"] for c in payload["sanity"]] == [c.name for c in run_checks(load_run(gated_report.parent).records)]
    # 3 attacks x 2 gate grads (fgsm/pgd/slowdown hard) + 2 attacks open, 3 eps each
    assert len(payload["summary"]) == (3 * 2 + 2) * 3
    assert all("same_superclass" in row for row in payload["summary"])  # fine_to_coarse came from the manifest
    worst = {(r["gate_mode"], r["eps"]): r["robust_acc"] for r in payload["worst_case"]}
    assert worst[("hard", 0.0)] == pytest.approx(0.9) and worst[("hard", 8 / 255)] < 0.5
    csv = pd.read_csv(gated_report / "summary.csv")
    assert len(csv) == len(payload["summary"]) and "auroc_hamming" in csv.columns


def test_ungated_report_says_not_applicable(tmp_path):
    run_dir = write_run(tmp_path, attacked("resnet1", "resnet", 0), gated=False, metrics=False)
    out = write_report(load_run(run_dir), tmp_path / "elsewhere", n_boot=50).out
    assert out == tmp_path / "elsewhere"
    html = (out / "index.html").read_text()
    imgs = assert_self_contained(html)
    assert len(imgs) == 1  # robust accuracy vs eps only
    assert html.count("not applicable: model has no gates") >= 4
    assert "not applicable: model has no gates" in (out / "report.md").read_text()
    payload = json.loads((out / "summary.json").read_text())
    assert [k for k, v in payload["figures"].items() if v] == ["robust_accuracy"]
    compute = html[html.index("<h2>Compute</h2>"):html.index("<h2>Details</h2>")]
    assert "not applicable: model has no gates" in compute and "<img" not in compute and "slowdown" not in compute
    headline = payload["headline"]
    assert headline["compute_saved"] is None and headline["compute_reason"] == "not applicable: model has no gates"
    assert headline["gated"] is False and headline["gate_mode"] == "hard"
    assert "training_curves" in payload["figures"] and "no metrics.csv" in html


def test_missing_run_dir_or_records_is_a_clear_error(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match=r"no attack records under .*empty; run `dsn-robust attack .*empty` first"):
        load_run(tmp_path / "empty")
    assert load_run(tmp_path / "empty", require_records=False).records.empty


def test_load_run(gated_run):
    run = load_run(gated_run)
    assert run.name == "dsn1" and run.path_names == PATH_NAMES and run.full_macs == full_macs()
    assert run.metrics is not None and list(run.metrics["epoch"]) == [0, 1] and run.config is None
    assert len(run.records) == (3 * 2 + 2) * 3 * N


def test_markdown_renderer_escapes_pipes():
    md = tables.to_markdown(pd.DataFrame({"a": ["x|y"], "b": [1]}))
    assert md.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]
    assert "&lt;b&gt;" in tables.to_html(pd.DataFrame({"a": ["<b>"]}))
    assert format_eps(8 / 255) == "8/255" and format_eps(0.5) == "0.5"
    assert format_eps(float("inf")) == "inf"


def test_json_payload_is_strict_json():
    out = jsonable({"eps": [0.0, float("inf")], "x": float("nan"), "n": np.int64(3), "ok": np.bool_(True),
                    "frame": pd.DataFrame({"a": [1.5, np.nan]})})
    assert out == {"eps": [0.0, "inf"], "x": None, "n": 3, "ok": True, "frame": [{"a": 1.5}, {"a": None}]}
    json.dumps(out, allow_nan=False)


def test_comparison_of_identical_runs_finds_no_practical_difference(tmp_path):
    dsn = write_run(tmp_path, attacked("dsn", "dsn", 4))
    dual = write_run(tmp_path, attacked("dual", "dual", 0), gated=False)
    out = write_comparison(compare_dirs([dsn, dual], n_boot=200), tmp_path / "cmp")
    for name in ("index.html", "compare.md", "compare.csv", "compare.json"):
        assert (out / name).is_file()
    payload = json.loads((out / "compare.json").read_text())
    assert payload["schema"] == "dsn-robustness/compare/v1"
    assert payload["verdict"].startswith("Skipping (dsn(hard)): no practical difference from dual — one training "
                                         "seed: the interval covers test samples only")
    assert "(where they differ most" in payload["verdict"] and "exact McNemar p=1" in payload["verdict"]
    assert payload["pair_verdicts"][0]["kind"] == "equivalent" and payload["comparable"]
    pair = payload["verdict_pairs"][0]
    assert pair["diff"] == 0 and pair["diff_low"] <= 0 <= pair["diff_high"]
    html = (out / "index.html").read_text()
    assert_self_contained(html)
    assert payload["verdict"] in html and html.index(payload["verdict"]) < html.index("<img")
    saved = {v["label"]: v["compute_saved"] for v in payload["variants"]}
    assert saved["dual"] == pytest.approx(0.0) and saved["dsn(hard)"] == pytest.approx(1 / 6)


def test_comparison_reports_a_more_robust_skipping_run(tmp_path):
    dsn = write_run(tmp_path, attacked("dsn", "dsn", 4, robust_bonus=0.4, gate_grads=("none", "bpda")))
    dual = write_run(tmp_path, attacked("dual", "dual", 0), gated=False)
    out = write_comparison(compare_dirs([dual, dsn], labels=["static", "skip"], n_boot=200), tmp_path / "cmp")
    payload = json.loads((out / "compare.json").read_text())
    assert payload["reference"] == "static" and payload["skipping_variant"] == "skip(hard)"
    pair = payload["verdict_pairs"][0]
    assert pair["diff"] > 0.2 and pair["diff_low"] > 0
    assert payload["verdict"].startswith("Skipping (skip(hard)): more robust than static — one training seed")
    assert "exact McNemar p=" in payload["verdict"] and "negligible band ±2 points" in payload["verdict"]
    assert f"+{100 * pair['diff']:.1f}" in payload["verdict"]
    csv = pd.read_csv(out / "compare.csv")
    worst = csv[(csv.variant == "skip(hard)") & (csv.attack == "worst") & (csv.eps > 0.03)]
    assert len(worst) == 1 and worst["diff"].iloc[0] == pytest.approx(pair["diff"])


def test_comparison_splits_gate_modes_and_builds_transfer(tmp_path):
    records = pd.concat([attacked("dsn", "dsn", 4), attacked("dsn", "dsn", 4, gate_mode="open")])
    transfer = attacked("dsn", "dsn", 4, attacks=("pgd",)).assign(attack="pgd", source_run="dual")
    transfer["success"] = transfer["success"] & (transfer["sample"] % 2 == 0)
    transfer["adv_correct"] = transfer["clean_correct"] & ~transfer["success"]
    dsn = write_run(tmp_path, pd.concat([records, transfer], ignore_index=True))
    dual = write_run(tmp_path, attacked("dual", "dual", 0), gated=False)
    cmp = compare_dirs([dsn, dual], n_boot=100)
    assert [v.label for v in cmp.variants] == ["dsn(hard)", "dsn(open)", "dual"]
    assert [v.skipping for v in cmp.variants] == [True, False, False]
    assert [v.compute_saved for v in cmp.variants] == pytest.approx([1 / 6, 0.0, 0.0])
    assert [(p["a"], p["b"]) for p in cmp.pairs] == [("dsn(hard)", "dsn(open)"), ("dsn(hard)", "dual")]
    cross = cmp.transfer[~cmp.transfer["whitebox"]]
    assert set(zip(cross["source_run"], cross["run"])) == {("dual", "dsn")}
    # transfer successes were halved: below the white-box rate on the same target, attack and eps
    tm = cmp.transfer.set_index(["whitebox", "eps"])["success_rate"]
    assert tm[(False, 8 / 255)] < tm[(True, 8 / 255)]
    assert [c.status for c in cmp.sanity["dsn"] if c.name == "transfer-vs-whitebox"] == ["pass"]
    out = write_comparison(cmp, tmp_path / "cmp")
    assert (out / "figures" / "transfer_heatmap.png").read_bytes().startswith(PNG_MAGIC)
    assert "Transfer matrix" in (out / "index.html").read_text()
    with pytest.raises(RunDirError, match="labels"):
        compare_dirs([dsn, dual], labels=["only one"])


def test_write_report_returns_what_it_wrote(gated_run, tmp_path):
    report = write_report(load_run(gated_run), tmp_path / "rep", n_boot=50)
    assert report.out == tmp_path / "rep" and report.index == tmp_path / "rep" / "index.html"
    assert report.index.is_file() and report.run.name == "dsn1"
    payload = json.loads((report.out / "summary.json").read_text())
    assert len(report.summary) == len(payload["summary"]) == (3 * 2 + 2) * 3
    assert [(c.name, c.status, c.evidence) for c in report.checks] == \
        [(c["name"], c["status"], c["evidence"]) for c in payload["sanity"]]
    assert report.worst_case["robust_acc"].tolist() == pytest.approx([r["robust_acc"] for r in payload["worst_case"]])
    produced = {f.name: f.file for f in report.figures if f.produced}
    assert produced == {k: v for k, v in payload["figures"].items() if v}


def test_compare_runs_takes_loaded_results_not_directories(tmp_path):
    nowhere = tmp_path / "never-written"
    manifest = {"dataset": {"name": "synthetic"}, "seed": 0, "n": N, "full_macs": full_macs()}
    runs = [RunResults(nowhere / name, name, attacked(name, model, gates), dict(manifest, model=model))
            for name, model, gates in (("dsn", "dsn", 4), ("dual", "dual", 0))]
    cmp = compare_runs(runs, n_boot=100)
    assert not nowhere.exists()
    assert cmp.verdict.startswith("Skipping (dsn(hard)): no practical difference from dual")
    assert (cmp.n_boot, cmp.seed) == (100, 0) and [v.run for v in cmp.variants] == runs
    out = write_comparison(cmp, tmp_path / "cmp")
    payload = json.loads((out / "compare.json").read_text())
    assert payload["verdict"] == cmp.verdict and payload["bootstrap"]["n"] == 100
    assert [v["path"] for v in payload["variants"]] == [str(nowhere / "dsn"), str(nowhere / "dual")]


def test_load_run_reads_config_and_describes_the_run(tmp_path):
    run_dir = write_run(tmp_path, attacked("dsn2", "dsn", 4))
    (run_dir / "config.json").write_text(json.dumps({"model": "dsn", "seed": 3}))
    run = load_run(run_dir)
    assert run.config == {"model": "dsn", "seed": 3}
    assert run.eps == pytest.approx(EPS) and run.dataset_name == "synthetic" and run.model == "dsn"
    assert run.fine_to_coarse == [c // 5 for c in range(10)]
    (run_dir / "attacks" / "manifest.json").write_text("{not json")
    with pytest.raises(RunDirError, match="cannot read .*manifest.json"):
        load_run(run_dir)


def test_strength_table_states_effort_fidelity_and_convergence():
    evaluations = [
        {"attack": "fgsm", "kind": "single-step", "backend": "torchattacks", "norm": "linf", "gate_mode": "hard",
         "gate_grad": "bpda", "source_run": "", "config": {"norm": "linf"}},
        {"attack": "pgd", "kind": "iterative", "backend": "native", "norm": "linf", "gate_mode": "hard",
         "gate_grad": "sharp", "source_run": "", "config": {"steps": 20, "restarts": 2, "losses": ["ce", "margin"]}},
        {"attack": "square", "kind": "gradient-free", "backend": "torchattacks", "norm": "linf", "gate_mode": "hard",
         "gate_grad": "none", "source_run": "", "config": {"queries": 1000, "restarts": 1}},
        {"attack": "ddn", "kind": "minimal", "backend": "foolbox", "norm": "l2", "gate_mode": "hard",
         "gate_grad": "none", "source_run": "", "config": {"steps": 100},
         "convergence": {"clean_correct": 60, "found": 40, "share_found": 40 / 60, "median_norm": 0.5,
                         "converged": False}},
        {"attack": "pgd", "kind": "iterative", "backend": "native", "norm": "linf", "gate_mode": "hard",
         "gate_grad": "none", "source_run": "other", "config": {"steps": 20}},
    ]
    table = tables.strength_table(evaluations, {"hard/bpda": 0.62, "hard/sharp": 0.97, "hard/none": 1.0})
    assert len(table) == 4, "transfer evaluations are not the attacked run's own strength"
    rows = {(r["Attack"], r["Routing grad"]): r for _, r in table.iterrows()}
    assert rows[("fgsm", "bpda")]["Effort"] == "1 step" and rows[("fgsm", "bpda")]["Surrogate fidelity"] == "62%"
    assert rows[("pgd", "sharp")]["Effort"] == "20 steps x 2 restarts x losses ce+margin"
    assert rows[("square", "none")]["Effort"] == "1000 queries"
    assert "found 40/60 (67%)" in rows[("ddn", "none")]["Convergence"]
    assert "NOT converged" in rows[("ddn", "none")]["Convergence"], "an unconverged minimal attack says so"


def test_gate_figures_show_white_box_records_only():
    from reports.run_page import gate_figure_data
    from robustness import analysis

    records = attacked("dsn", "dsn", 4)
    transfer = attacked("dsn", "dsn", 4).assign(source_run="dual", eps=lambda d: d["eps"] * 1.01)
    mixed = pd.concat([records, transfer], ignore_index=True)
    summary = analysis.summarize(mixed, n_boot=20)
    fam, rows, summary_rows = gate_figure_data(mixed, summary)
    assert fam is not None and len(rows) and len(summary_rows)
    assert (rows["source_run"].fillna("") == "").all() and (summary_rows["source_run"].fillna("") == "").all()
    assert sorted(summary_rows["eps"].unique()) == sorted(records[records["attack"] == fam["attack"]]["eps"].unique())
    assert len(rows) == len(analysis.select(records, fam))  # as if the transfer records were not there


def test_linf_budgets_are_always_in_units_of_1_255():
    assert format_eps(0.47 / 255, "linf") == "0.47/255"  # was 0.001843 beside 0.75/255
    assert format_eps(17.5 / 255, "linf") == "17.5/255" and format_eps(13.25 / 255, "linf") == "13.25/255"
    assert format_eps(8 / 255, "linf") == "8/255" and format_eps(0.5, "l2") == "0.5"
    assert format_eps(0.47 / 255) == "0.001843"  # no norm given: a decimal, never a guess at the unit


def test_the_per_attack_table_follows_the_runs_attack_order_within_a_kind():
    from reports import tables

    from robustness.analysis.pivot import WORST_ROW

    pivot = pd.DataFrame({"attack": ["apgd-ce", "pgd", "fgsm", WORST_ROW], "norm": ["linf"] * 4,
                          "eps": [8 / 255] * 4, "robust_acc": [0.3, 0.4, 0.6, 0.3]})
    cascade = tables.pivot_table(pivot, order=["fgsm", "pgd", "apgd-ce"])
    assert cascade["Attack"].tolist() == ["fgsm", "pgd", "apgd-ce", WORST_ROW]
    assert tables.pivot_table(pivot)["Attack"].tolist() == ["fgsm", "apgd-ce", "pgd", WORST_ROW]
