"""Writing reports: one run (:func:`write_report`) and a skip vs no-skip comparison (:func:`write_comparison`).

Rendering only: the run comes loaded (``robustness.results``), the verdict comes computed
(``robustness.analysis.compare``). Each report is a self-contained ``index.html`` (figures as base64 ``data:``
URIs, inline CSS, no external references), a Markdown twin with figures under ``figures/``, a CSV and a versioned
JSON. Every file is written atomically; ``index.html`` is written last.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from attacks.base import COMPUTE, attacks_of_kind
from reports import plots, tables
from robustness import analysis
from robustness.analysis import verdict as verdict_rule
from robustness.analysis.compare import Comparison, run_sanity
from robustness.analysis.seeds import SeedComparison
from robustness.analysis.headline import RunHeadline, run_headline
from robustness.core.rundir import RunDir, atomic_write, atomic_write_text
from robustness.core.runtime import jsonable
from robustness.results import RunResults
from robustness.sanity import Check, worst_status

log = logging.getLogger(__name__)

REPORT_SCHEMA = "dsn-robustness/report/v1"
COMPARE_SCHEMA = "dsn-robustness/compare/v1"
NO_GATES = "not applicable: model has no gates"
NO_ATTACK = "not applicable: no white-box attack at eps > 0"


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class FigureItem:
    """A figure slot of a report: the PNG when produced, else the reason it is not."""

    name: str
    title: str
    caption: str
    png: bytes | None
    reason: str = ""

    @property
    def produced(self) -> bool:
        return self.png is not None

    @property
    def file(self) -> str:
        """Path relative to the report directory."""
        return f"figures/{self.name}.png"

    @property
    def png_b64(self) -> str | None:
        return base64.b64encode(self.png).decode("ascii") if self.png is not None else None


@dataclass
class TableItem:
    """A display table rendered once for HTML and once for Markdown."""

    title: str
    frame: pd.DataFrame
    note: str = ""
    collapsed: bool = False
    html: Markup = field(init=False)
    md: str = field(init=False)

    def __post_init__(self) -> None:
        quiet = self.frame.empty and bool(self.note)  # the note already says why there is nothing
        self.html = Markup("" if quiet else tables.to_html(self.frame))
        self.md = "" if quiet else tables.to_markdown(self.frame)


@lru_cache(maxsize=1)
def _env() -> Environment:
    return Environment(loader=FileSystemLoader(str(Path(__file__).parent / "templates")),
                       autoescape=select_autoescape(enabled_extensions=("html.j2",), default_for_string=False,
                                                    default=False),
                       undefined=StrictUndefined, trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True)


def _render(template: str, context: Mapping[str, Any]) -> str:
    return _env().get_template(template).render(**context)


def _json_text(payload: Mapping[str, Any]) -> str:
    return json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n"


def _sanity_rows(checks: Sequence[Check]) -> list[dict[str, str]]:
    """The checks as the JSON payloads list them (name, status, evidence)."""
    return [{"name": c.name, "status": c.status, "evidence": c.evidence} for c in checks]


def _write_outputs(out: Path, figures: Sequence[FigureItem], texts: Mapping[str, str], html: str) -> None:
    """Figures, then the text files, then ``index.html`` — each atomically; stale figures are removed. When a write
    fails (a folder that cannot be written, a full disk: one RunDirError line from ``atomic_write``) the folders
    this call created are removed again, so a failed report leaves no half-made output behind."""
    created = _first_missing(out)
    try:
        fig_dir = out / "figures"
        for f in figures:
            target = out / f.file
            if f.png is not None:
                atomic_write(target, lambda tmp, data=f.png: tmp.write_bytes(data))
            elif target.is_file():  # is_file, not unlink(missing_ok): under a regular file unlink is ENOTDIR
                target.unlink()
        for name, text in texts.items():
            atomic_write_text(out / name, text)
        atomic_write_text(out / "index.html", html)
        if fig_dir.is_dir() and not any(fig_dir.iterdir()):
            fig_dir.rmdir()
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet: what writing there creates."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


# ---------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------

def _family_title(fam: Mapping[str, str]) -> str:
    return f"{fam['attack']} ({fam['backend']}, {fam['norm']}, gate_grad={fam['gate_grad']}, " \
           f"{fam['gate_mode']} gates, {fam['target']} head)"


def _accuracy_curves(records: pd.DataFrame) -> pd.DataFrame:
    """Robust accuracy per white-box accuracy attack at its strongest backend and routing gradient per sample, and
    the worst case, labelled for :func:`plots.plot_accuracy_curves`. Compute attacks are no robust accuracy (they
    have their own section); one line per attack, not per (backend, gradient): 4 routing gradients x 6 attacks
    made a legend taller than its panel (the appendix and the routing-gradient check keep the split)."""
    rows = analysis.accuracy_rows(analysis.whitebox(records))
    acc = analysis.robust_accuracy_table(analysis.strongest_per_sample(rows))
    if acc.empty:
        return acc
    acc["label"] = ["worst case" if a == "worst" else str(a) for a in acc["attack"]]
    acc["panel"] = [f"{n}, {t} head, {m} gates" for n, t, m in zip(acc["norm"], acc["target"], acc["gate_mode"])]
    return acc


def _grad_curves(records: pd.DataFrame) -> tuple[bytes | None, str]:
    """The robustness curves of the deployed gate mode, one per routing gradient plus their minimum ('any'), in
    the first norm (linf before l2) and head that have minimal distances; with the fixed-eps worst case as points."""
    from robustness.analysis.distances import minimal_distances, robustness_curve
    dist = minimal_distances(records, by_grad=True)
    if dist.empty:
        return None, "not applicable: no minimal-perturbation records (eps = inf)"
    mode = "hard" if (dist["gate_mode"] == "hard").any() else str(dist["gate_mode"].iloc[0])
    norm = "linf" if (dist["norm"] == "linf").any() else "l2"
    dist = dist[(dist["gate_mode"] == mode) & (dist["norm"] == norm)]
    dist = dist[dist["target"] == ("fine" if (dist["target"] == "fine").any() else dist["target"].iloc[0])]
    overall = minimal_distances(records)
    overall = overall[overall.set_index(["gate_mode", "norm", "target"]).index.isin(
        dist.set_index(["gate_mode", "norm", "target"]).index.unique())]
    curves = pd.concat([robustness_curve(dist, by_grad=True).rename(columns={"gate_grad": "variant"}),
                        robustness_curve(overall).assign(variant="any")], ignore_index=True)
    if curves["variant"].nunique() == 2:  # one routing gradient: its curve is the minimum
        curves = curves[curves["variant"] == "any"]
    worst = analysis.worst_case_accuracy(records)
    fixed = worst[(worst["norm"] == norm) & (worst["gate_mode"] == mode) & (worst["source_run"] == "")
                  & np.isfinite(worst["eps"].astype(float)) & (worst["eps"] > 0)] if len(worst) else worst
    if len(fixed) and "target" in fixed:
        fixed = fixed[fixed["target"] == dist["target"].iloc[0]]
    fixed = fixed.assign(variant="any")[["variant", "eps", "robust_acc"]] if len(fixed) else None
    png = plots.plot_robustness_curves(curves, fixed, title=f"Robustness curves ({norm}, {mode} gates)")
    return png, "" if png is not None else "not applicable: no data to plot"


def _training_reason(run: RunResults) -> str:
    if run.metrics is None or run.metrics.empty:
        return "not applicable: the run directory has no metrics.csv (or it is empty)"
    return "not applicable: metrics.csv has none of the columns " + ", ".join(
        c for _, _, cols in plots.TRAINING_PANELS for c in cols)


def report_figures(run: RunResults, summary: pd.DataFrame) -> list[FigureItem]:
    """The figures of a one-run report (each produced or with the reason it is not). The gate figures show
    :func:`analysis.primary_evaluation`'s family: the deployed (``hard``) forward of a gated model."""
    rec = run.records
    gated = analysis.is_gated(rec)
    fam, fam_rec, fam_summary = gate_figure_data(rec, summary)
    fam_title = _family_title(fam) if fam else ""

    def slot(name: str, title: str, caption: str, make, needs_paths: bool = True) -> FigureItem:
        if needs_paths and not gated:
            return FigureItem(name, title, caption, None, NO_GATES)
        if needs_paths and not fam:
            return FigureItem(name, title, caption, None, NO_ATTACK)
        png = make()
        return FigureItem(name, title, caption, png, "" if png is not None else "not applicable: no data to plot")

    training = plots.plot_training_curves(run.metrics, gated=gated)
    curves_png, curves_reason = _grad_curves(rec)
    return [
        FigureItem("robustness_curves", "Robustness curves per routing gradient",
                   "Share of samples whose minimal adversarial distance (minimum over the minimal-perturbation "
                   "attacks) exceeds eps, deployed gate mode, per routing gradient and their per-sample minimum "
                   "('any'); bands: pointwise 95% Wilson; diamonds: the fixed-eps worst case.",
                   curves_png, curves_reason),
        slot("robust_accuracy", "Robust accuracy vs eps",
             "Accuracy of the attacked head per accuracy attack, each at its strongest backend and routing "
             "gradient per sample; dashed black: per-sample worst case over all of them; bands: 95% Wilson; "
             "eps = inf is not drawn; compute attacks are in the Compute section.",
             lambda: plots.plot_accuracy_curves(_accuracy_curves(rec)), needs_paths=False),
        FigureItem("training_curves", "Training curves",
                   "Per epoch from metrics.csv: test (solid) and train (dotted) accuracy"
                   + (", share of gated blocks skipped per branch, MACs saved vs every block executed." if gated
                      else "."), training, "" if training is not None else _training_reason(run)),
        slot("flip_heatmap", "Per-block flip rates", f"Share of samples whose gate flipped, {fam_title}.",
             lambda: plots.plot_flip_heatmap(analysis.block_rates(fam_rec[fam_rec["eps"] > 0], run.path_names),
                                             title=fam_title)),
        slot("hamming_by_success", "Hamming distance by attack outcome",
             f"Gates flipped between clean and adversarial path, initially-correct samples, {fam_title}.",
             lambda: plots.plot_hamming_by_success(fam_rec, title=fam_title)),
        slot("macs", "Compute: clean vs attacked",
             f"Mean executed MACs per sample on clean inputs and under {fam_title}; dashed: every block executed.",
             lambda: plots.plot_macs(fam_rec, None, run.full_macs, title=f"Compute under {fam_title}")),
        slot("success_by_path_change", "Success with vs without path change",
             f"Attack success among initially-correct samples, 95% Wilson intervals, {fam_title}.",
             lambda: plots.plot_success_by_path_change(fam_summary, title=fam_title)),
    ]


def gate_figure_data(rec: pd.DataFrame, summary: pd.DataFrame) -> tuple[dict[str, str] | None, pd.DataFrame,
                                                                         pd.DataFrame]:
    """The family the gate figures show (:func:`analysis.primary_evaluation`), its records and its summary rows:
    white-box only. The family's keys do not name the source run, so selecting by them alone mixed transfer
    records crafted on another model into the heatmaps and doubled the eps columns."""
    fam = analysis.primary_evaluation(rec)
    if not fam:
        return None, rec.iloc[:0], summary.iloc[:0]
    return fam, analysis.select(analysis.whitebox(rec), fam), analysis.select(analysis.whitebox(summary), fam)


def compute_section(run: RunResults, scope: Mapping[str, str] | None,
                    table: pd.DataFrame | None) -> tuple[TableItem, FigureItem]:
    """The compute attacks' table and figure from ``table`` (``analysis.compute_attack_table``: MACs clean vs
    attacked vs every block executed, and the share of the saved compute taken back), or why there are none."""
    title, name = "Compute attacks", "compute_attacks"
    caption = ("Mean MACs per sample on clean inputs and under each compute attack (per sample the most over "
               "backends and routing gradients); dashed: every block executed; labels: share of the saved compute "
               "taken back = mean(attacked - clean) / (all blocks - mean clean).")
    if table is None or not analysis.is_gated(run.records):
        return TableItem(title, pd.DataFrame(), NO_GATES), FigureItem(name, title, caption, None, NO_GATES)
    if table.empty:
        reason = (f"not applicable: no compute attack ({', '.join(attacks_of_kind(COMPUTE))}) ran at eps > 0 in "
                  "the deployed gate mode")
        return TableItem(title, pd.DataFrame(), reason), FigureItem(name, title, caption, None, reason)
    png = plots.plot_compute_attacks(table)
    mode = scope["gate_mode"] if scope else ""
    return (TableItem(title, tables.compute_attack_display(table),
                      f"{mode} gates; a compute attack tries to make the model execute more blocks, not to flip its "
                      "prediction, so it has no robust accuracy."),
            FigureItem(name, "MACs under compute attacks", caption, png,
                       "" if png is not None else "not applicable: no data to plot"))


def _overall(checks: Sequence[Check]) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in ("fail", "pass", "warn", "skip")}
    failed = f"{counts['fail']} fail, " if counts["fail"] else ""
    return (f"{worst_status(checks).upper()} ({failed}{counts['pass']} pass, {counts['warn']} warn, "
            f"{counts['skip']} skip)")


def _eps_by_norm(records: pd.DataFrame) -> str:
    """The run's budgets per norm for the page's meta line: ``L∞ 1/255, 2/255 · L2 0.25, 0.5``."""
    if records.empty:
        return tables.DASH
    per_norm = records.groupby("norm", observed=True)["eps"].unique()
    return " · ".join(f"{tables.NORM_NAMES.get(str(n), n)} " + ", ".join(tables.eps_text(str(n), e)
                                                                          for e in sorted(per_norm[n]))
                      for n in sorted(per_norm.index, key=lambda n: (n != "linf", str(n))))


def _cascaded(records: pd.DataFrame) -> bool:
    """Whether the attack cascade carried a row over (attacks.runner.cascade)."""
    return bool(len(records)) and bool((records["found_by"].astype(str) != records["attack"].astype(str)).any())


def _metadata(run: RunResults) -> dict[str, Any]:
    return {"run": run.name, "model": run.model, "dataset": run.dataset, "seed": run.seed, "n": run.n,
            "eps": run.eps, "versions": run.versions, "path_names": run.path_names, "full_macs": run.full_macs}


@dataclass
class RunReport:
    """What :func:`write_report` computed and where it wrote it."""

    out: Path
    run: RunResults
    summary: pd.DataFrame      # analysis.summarize
    worst_case: pd.DataFrame   # analysis.worst_case_accuracy
    block_rates: pd.DataFrame  # analysis.block_rates
    checks: list[Check]
    figures: list[FigureItem]  # every figure slot, the compute section's included
    headline: RunHeadline | None = None
    pivot: pd.DataFrame | None = None  # analysis.accuracy_pivot

    @property
    def index(self) -> Path:
        """The report's ``index.html``."""
        return self.out / "index.html"


def write_report(run: RunResults, out_dir: str | Path | None = None, *, n_boot: int = 1000, seed: int = 0,
                 zero_grad_share: float | dict[str, float] | None = None) -> RunReport:
    """Write the report of a loaded run to ``out_dir`` (default ``RUN_DIR/report``) and return what it computed.

    Holds the run's writer lock (a report beside an attack that is still writing is refused in one line, wherever
    the report goes); re-entrant, so a caller that holds it already (``dsn-robust report`` across loading and
    writing, the pipeline for its whole job) goes on. Results without a run directory on disk take no lock.

    Files: ``index.html``, ``report.md``, ``figures/*.png``, ``summary.csv``, ``summary.json``. The page opens with
    the headline (:func:`robustness.analysis.headline.run_headline`, also ``summary.json``'s ``headline``) and the
    attack x eps pivot; the long per-evaluation table is an appendix at the end (and ``summary.csv``). Incomplete
    records (:attr:`RunResults.complete`) put their ``INCOMPLETE: ...`` line at the top of the page and of the
    headline.
    """
    rd = RunDir.at(run.path)
    out = rd.report if out_dir is None else Path(out_dir)
    if out_dir is None or rd.root.is_dir():
        with rd.writing("report"):
            return _write_report(run, out, n_boot, seed, zero_grad_share)
    return _write_report(run, out, n_boot, seed, zero_grad_share)


def headline_rows(headline: RunHeadline) -> list[dict[str, str]]:
    """The headline box's rows: :func:`reports.tables.headline_table`, opened by the ``INCOMPLETE`` row of
    incomplete records and closed by the count of samples with non-finite logits when there are any."""
    rows = tables.headline_table(headline)
    if not headline.complete:
        rows.insert(0, {"label": "Records", "value": "INCOMPLETE", "detail": headline.incomplete})
    if headline.model_check:
        rows.append({"label": "Model check", "value": headline.model_check.value,
                     "detail": headline.model_check.detail})
    if headline.nonfinite:
        rows.append({"label": "Non-finite logits", "value": str(headline.nonfinite),
                     "detail": "samples whose clean or adversarial logits were NaN or infinite in some evaluation: "
                               "their predictions mean nothing, and every number above counts them"})
    return rows


def _write_report(run: RunResults, out: Path, n_boot: int, seed: int,
                  zero_grad_share: float | dict[str, float] | None) -> RunReport:
    rec = run.records
    log.info("report for %s: %d records", run.name, len(rec))
    summary = analysis.summarize(rec, run.full_macs, run.fine_to_coarse, n_boot=n_boot, seed=seed)
    worst = analysis.worst_case_accuracy(rec)
    rates = analysis.block_rates(rec, run.path_names)
    checks = run_sanity(run, zero_grad_share)  # the same verdicts as the comparison page shows for this run
    figures = report_figures(run, summary)
    meta = _metadata(run)
    headline = run_headline(run, checks, n_boot=n_boot, seed=seed)
    scope = analysis.headline_scope(rec)
    pivot = analysis.accuracy_pivot(rec, scope)
    gated = analysis.is_gated(rec)
    compute_attacks = analysis.compute_attack_table(rec, run.full_macs, scope) if gated else None
    compute_table, compute_figure = compute_section(run, scope, compute_attacks)

    where = f"{headline.target} head, {headline.gate_mode} gates" if gated else f"{headline.target} head"
    cascade = (" The attacks ran as a cascade (each on what those before it left robust, per routing gradient): an "
               "attack's number is the accuracy after it and the attacks before it." if _cascaded(rec) else "")
    order = list(dict.fromkeys(str(e.get("attack")) for e in run.manifest.get("evaluations", [])))
    pivot_item = TableItem("Robust accuracy per attack and eps", tables.pivot_table(pivot, order),
                           f"{where}, white-box; each attack at its strongest backend and routing gradient per "
                           f"sample; '{analysis.WORST_ROW}' = robust only if every attack failed. Intervals: "
                           f"headline and appendix.{cascade}" if len(pivot) else
                           "No white-box accuracy attack at a finite eps > 0 in the deployed gate mode.")
    appendix = [TableItem("Summary per evaluation", tables.summary_table(summary),
                          "Every evaluation (also in summary.csv). Success rate, P(success | path change), AUROC and "
                          "frozen-path survival are over initially-correct samples; intervals are 95% (Wilson or "
                          "bootstrap); compute attacks have no robust accuracy.", collapsed=True)]
    tables_top = [TableItem("Worst case over attacks", tables.worst_case_table(worst),
                            "A sample counts as robust only if it is correct on the clean input and every "
                            "white-box attack, under every routing gradient, failed on it: the number to trust."),
                  TableItem("Attack strength", tables.strength_table(run.evaluations, run.surrogate_fidelity),
                            "Effort per evaluation; surrogate fidelity = share of (first-batch) samples on which "
                            "the network the attacker differentiates predicts what the deployed one does; a "
                            "minimal-norm attack has converged when it found an adversarial example for >= 99% "
                            "of the clean-correct samples.", collapsed=True)]
    tables_bottom = [TableItem("Per-block execution and flip rates", tables.flip_table(rates),
                               "Flip rates are shares of all samples.", collapsed=True) if gated else
                     TableItem("Per-block execution and flip rates", pd.DataFrame(), NO_GATES),
                     TableItem("Evaluations (attacks manifest)",
                               tables.evaluations_table(run.evaluations), collapsed=True)]
    last = tables.metrics_table(run.metrics)
    if last is not None:
        tables_bottom.append(TableItem("Training: last epoch", last))

    context = {"run": run.name, "model": meta["model"], "dataset": run.dataset_name or tables.DASH,
               "seed": meta["seed"], "n": meta["n"], "eps": _eps_by_norm(rec),
               "headline": headline_rows(headline), "incomplete": headline.incomplete, "subset": headline.subset,
               "model_warning": headline.model_check.warning if headline.model_check else "",
               "pivot": pivot_item,
               "checks": checks, "overall": _overall(checks), "tables_top": tables_top,
               "tables_bottom": tables_bottom, "figures": figures, "compute_table": compute_table,
               "compute_figure": compute_figure, "appendix": appendix, "versions": meta["versions"] or {},
               "bootstrap": {"n": n_boot, "seed": seed}}
    figures = [*figures, compute_figure]
    payload = {"schema": REPORT_SCHEMA, **meta, "evaluations": run.evaluations,
               "bootstrap": {"n": n_boot, "seed": seed, "confidence": 0.95},
               "headline": headline.as_dict(), "pivot": pivot, "compute_attacks": compute_attacks,
               "figures": {f.name: (f.file if f.produced else None) for f in figures},
               "summary": summary, "worst_case": worst, "sanity": _sanity_rows(checks)}
    html_text = _render("report.html.j2", context)
    _write_outputs(out, figures, {
        "summary.csv": summary.to_csv(index=False),
        "summary.json": _json_text(payload),
        "report.md": _render("report.md.j2", context),
    }, html_text)
    log.info("wrote report to %s", out)
    return RunReport(out, run, summary, worst, rates, checks, figures, headline, pivot)


# ---------------------------------------------------------------------------------------------------------------
# Comparison of runs
# ---------------------------------------------------------------------------------------------------------------

def _comparison_payload(cmp: Comparison) -> dict[str, Any]:
    ref, skip = cmp.reference, cmp.skipping
    return {
        "schema": COMPARE_SCHEMA, "verdict": cmp.verdict, "verdict_lead": cmp.lead, "reference": ref.label,
        "skipping_variant": skip.label if skip else None, "scope": cmp.scope,
        "pair_verdicts": [v.as_dict() for v in cmp.verdicts], "comparable": cmp.comparable,
        "confounded": cmp.confounded, "not_comparable": cmp.not_comparable,
        "verdict_rule": _rule_payload(), "verdict_pairs": cmp.pairs,
        "common_attacks": cmp.common_attacks,
        "variants": [{"label": v.label, "run": v.run.name, "path": str(v.run.path), "model": v.run.model,
                      "gate_mode": v.gate_mode, "skipping": v.skipping, "dataset": v.run.dataset,
                      "seed": v.run.seed, "n": v.run.n,
                      "full_macs": v.run.full_macs, "compute_saved": v.compute_saved,
                      "versions": v.run.versions, "subset_sha256": v.run.subset.get("sha256"),
                      "final_test_accuracy": v.run.final_test_accuracy, "chance_accuracy": v.run.chance_accuracy,
                      "evaluations": v.run.evaluations} for v in cmp.variants],
        "eps": sorted({e for r in cmp.runs for e in r.eps}),
        "bootstrap": {"n": cmp.n_boot, "seed": cmp.seed, "confidence": 0.95},
        "robust_accuracy": cmp.table, "paired_differences": cmp.differences, "transfer": cmp.transfer,
        "compute": cmp.compute,
        "distance_verdict": [dataclasses.asdict(p) for p in cmp.distance_pairs],
        "robustness_curves": cmp.curves, "clean_accuracy": cmp.clean,
        "health": _sanity_rows(cmp.health),
        "sanity": {k: _sanity_rows(v) for k, v in cmp.sanity.items()},
        "notes": cmp.notes,
    }


def _rule_payload() -> dict[str, Any]:
    """The constants of the verdict rule (``robustness.analysis.verdict``), as compare.json records them."""
    return {"alpha": verdict_rule.ALPHA, "ratio_band": list(verdict_rule.RATIO_BAND),
            "accuracy_band": list(verdict_rule.ACCURACY_BAND), "min_both_correct": verdict_rule.MIN_BOTH_CORRECT,
            "near_chance_factor": verdict_rule.NEAR_CHANCE_FACTOR, "max_clean_gap": verdict_rule.MAX_CLEAN_GAP,
            "chance_alpha": verdict_rule.CHANCE_ALPHA,
            "min_seeds_for_test": verdict_rule.MIN_SEEDS_FOR_TEST}


def _seeds_payload(cmp: SeedComparison) -> dict[str, Any]:
    """compare.json of a seed-replicated comparison: the pooled verdict and pairs, then every seed's complete
    comparison payload."""
    return {
        "schema": COMPARE_SCHEMA, "kind": "seeds", "verdict": cmp.verdict, "verdict_lead": cmp.lead,
        "scope": cmp.scope, "seeds": cmp.seeds, "labels": cmp.labels, "comparable": cmp.comparable,
        "confounded": cmp.confounded, "not_comparable": cmp.not_comparable, "verdict_rule": _rule_payload(),
        "bootstrap": {"n": cmp.n_boot, "seed": cmp.seed, "confidence": 0.95,
                      "pooled": "hierarchical: seeds, then the shared test images"},
        "pooled": cmp.pooled, "clean_accuracy": cmp.clean, "notes": cmp.notes,
        "per_seed": {str(s): _comparison_payload(c) for s, c in cmp.per_seed.items()},
    }


def _rule_note(distances: bool) -> str:
    v = verdict_rule
    lo, hi = v.RATIO_BAND
    test = (f"a significant Wilcoxon signed-rank test (two-sided, alpha {v.ALPHA:g}) on the per-sample log distance "
            f"ratios and a ratio interval outside the negligible band [{lo:.2f}, {hi:.2f}]" if distances else
            f"a significant exact McNemar test (two-sided, alpha {v.ALPHA:g}, Bonferroni over the candidate eps) on "
            f"the paired robust flags and a difference interval outside ±{100 * v.ACCURACY_BAND[1]:g} points")
    return (f"'More / less robust' needs {test}; an interval inside the band is 'no practical difference', one "
            "that contains no difference with a non-significant test is 'no evidence of a difference', anything "
            "else 'inconclusive' (with the reason). A pair is 'confounded by clean accuracy' when a side is below "
            f"{v.NEAR_CHANCE_FACTOR:g} x chance or the clean accuracies differ by more than "
            f"{100 * v.MAX_CLEAN_GAP:g} points, and 'not comparable' with fewer than {v.MIN_BOTH_CORRECT} samples "
            "correct on both, a side at chance level on clean data (not significantly above chance by a one-sided "
            f"binomial test at {v.CHANCE_ALPHA:g}) or different attacked images or data.")


def _comparison_parts(cmp: Comparison) -> tuple[dict[str, Any], list[FigureItem]]:
    """The page context and figures of one comparison (one seed's, for a seed-replicated one)."""
    ref = cmp.reference
    if cmp.distance_pairs:
        verdict_note = ("Eps-free: each sample's minimal adversarial distance is the smallest verified example of "
                        "any minimal-perturbation attack (FMN, DDN, PGD bisection) under any routing gradient. "
                        "Ratio = median over the samples both variants classify correctly of d(skipping) / "
                        "d(static), 95% paired-bootstrap interval. The curves (details, no verdict) count every "
                        "sample (a misclassified one is at 0); the largest difference's interval re-selects its "
                        "eps in each resample. " + _rule_note(True))
    else:
        verdict_note = (f"No minimal-distance records: fixed-eps fallback. Worst case = per sample, over the attacks "
                        f"every variant ran ({', '.join(cmp.common_attacks) or 'none'}), each at its strongest "
                        "backend and routing gradient, at the eps where the variants differ most (never where both "
                        "are saturated: 0% or their clean accuracy; the interval re-selects the eps in every "
                        "resample). Differences in percentage points, paired-bootstrap 95% intervals. "
                        + _rule_note(False))
    verdict_note += f" {cmp.scope[0].upper()}{cmp.scope[1:]}." if cmp.scope else ""
    fixed = pd.DataFrame(columns=["variant", "eps", "robust_acc"])
    if len(cmp.curves):
        norm, head = str(cmp.curves["norm"].iloc[0]), str(cmp.curves["target"].iloc[0])
        t = cmp.table
        fixed = t[(t["attack"] == "worst") & (t["norm"] == norm) & (t["target"] == head) & (t["eps"] > 0)
                  & np.isfinite(t["eps"].astype(float))]
    robustness_png = plots.plot_robustness_curves(cmp.curves, fixed, title="Robust accuracy vs eps, from each "
                                                  "sample's minimal distance (bands: 95% Wilson; diamonds: "
                                                  "fixed-eps worst case)")
    lead_figures = [FigureItem(
        "robustness_curves", "Robustness curves",
        "Share of samples whose minimal adversarial distance exceeds eps, per variant (minimum over attacks and "
        "routing gradients); diamonds: the fixed-eps attacks' per-sample worst case at the grid, which should lie "
        "in the band (the sanity check curve-vs-fixed-eps tests it).", robustness_png,
        "" if robustness_png else "not applicable: no minimal-perturbation records (eps = inf)")]
    lead_tables = ([TableItem("Verdict per pair", tables.verdict_table(cmp.distance_pairs, cmp.verdicts))]
                   if cmp.distance_pairs else
                   [TableItem("Verdict per pair", tables.pair_verdict_table(cmp.verdicts))] if cmp.verdicts else []
                   ) + [TableItem("Clean accuracy", tables.clean_table(cmp.clean))]
    curves = cmp.table.assign(panel=[f"{a} ({n}, {t})" for a, n, t in
                                     zip(cmp.table["attack"], cmp.table["norm"], cmp.table["target"])])
    at = cmp.compute["at"].iloc[0] if len(cmp.compute) else "-"
    curve_png = plots.plot_accuracy_curves(curves, line="variant", highlight=None)
    compute_png = plots.plot_compute_vs_robust(cmp.compute, title=f"Compute saved vs robust accuracy ({at})")
    figures = [
        FigureItem("robust_accuracy", "Robust accuracy vs eps per attack",
                   "Per attack at its strongest backend/routing gradient; 'worst' = per-sample worst case over the "
                   "shared attacks; bands: 95% Wilson.", curve_png,
                   "" if curve_png else "not applicable: no white-box records at finite eps"),
        FigureItem("compute_vs_robust", "Compute saved vs robust accuracy",
                   "Compute saved = 1 - mean clean MACs / all-blocks MACs.", compute_png,
                   "" if compute_png else "not applicable: no full_macs or no shared worst case"),
    ]
    transfer_png = plots.plot_transfer_heatmap(cmp.transfer)
    figures.append(FigureItem(
        "transfer_heatmap", "Transfer matrix (source → target)",
        "Share of the target's clean-correct samples fooled by examples crafted on the source (rows) against the "
        "target (columns); the outlined diagonal is the target's own white-box attack; one panel per attack and eps.",
        transfer_png, "" if transfer_png else "not applicable: no transfer records (source_run != '')"))
    tables_ = [TableItem("Robust accuracy and paired difference to " + ref.label, tables.comparison_table(cmp.table),
                         "Δ = variant − reference on the samples both evaluated, percentage points."),
               TableItem("Compute", tables.compute_table(cmp.compute)),
               TableItem("Transfer (source → target)", tables.transfer_table(cmp.transfer),
                         "" if len(cmp.transfer) else "No transfer records (source_run != '').")]
    context = {"variants": cmp.variants, "reference": ref.label, "verdict": cmp.lead, "verdict_line": cmp.verdict,
               "answer": cmp.answer,
               "verdict_note": verdict_note, "seed_tables": [], "detail_note": "", "lead_tables": lead_tables,
               "lead_figures": lead_figures, "health": cmp.health, "comparable": cmp.comparable,
               "sanity": cmp.sanity, "tables": tables_, "figures": figures,
               "notes": cmp.notes, "bootstrap": {"n": cmp.n_boot, "seed": cmp.seed}}
    return context, lead_figures + figures


def write_comparison(cmp: Comparison | SeedComparison, out_dir: str | Path) -> Path:
    """Write a comparison (``robustness.analysis.compare.compare_runs``, or ``compare_seeds`` for seed-replicated
    runs) to ``out_dir`` and return that directory.

    Files: ``index.html``, ``compare.md``, ``figures/*.png``, ``compare.csv`` (robust accuracy per variant, attack and
    eps with the paired difference to the first variant; with a ``seed`` column for seed-replicated runs),
    ``compare.json`` (schema ``dsn-robustness/compare/v1``, with the one-line ``verdict``; for seeds the pooled
    verdict and pairs, then every seed's complete payload under ``per_seed``). A seed-replicated page opens with
    the pooled verdict, then the per-seed verdicts side by side, then the first seed's detail sections.
    """
    out = Path(out_dir)
    if isinstance(cmp, SeedComparison):
        first = cmp.first
        context, figures = _comparison_parts(first)
        lo, hi = verdict_rule.RATIO_BAND
        seeds_note = (f"Pooled over training seeds {', '.join(map(str, cmp.seeds))}: the ratio is the median over "
                      "every seed's samples correct on both; its interval is a hierarchical bootstrap (resample "
                      "the seeds, then the shared test images) and its test is the exact sign-flip test over the "
                      "per-seed median log ratios (a training seed is the unit of replication; with k seeds its "
                      f"smallest p is 2/2^k, so fewer than {verdict_rule.MIN_SEEDS_FOR_TEST} seeds cannot reach "
                      f"p < {verdict_rule.ALPHA:g} and claim more / less robust). Negligible band [{lo:.2f}, "
                      f"{hi:.2f}]. A pair confounded or not comparable in any seed is so pooled. "
                      f"{cmp.scope[0].upper()}{cmp.scope[1:]}.") if len(cmp.seeds) > 1 else context["verdict_note"]
        seed_tables = ([TableItem("Pooled verdict per pair", tables.pooled_table(cmp.pooled)),
                        TableItem("Per-seed verdicts", tables.seed_table(cmp.pooled, cmp.clean),
                                  "Each seed's own comparison: clean accuracy of each model on the attacked "
                                  "samples, the seed's median distance ratio with its samples-only interval, its "
                                  "Wilcoxon p and finding.")] if cmp.pooled else [])
        health = [Check(c.name, c.status, f"seed {s}: {c.evidence}")
                  for s, c_ in cmp.per_seed.items() for c in c_.health]
        context.update(verdict=cmp.lead, verdict_line=cmp.verdict, answer=cmp.answer,
                       verdict_note=seeds_note, seed_tables=seed_tables,
                       detail_note=(f"The sections below are seed {cmp.seeds[0]}'s comparison (every seed's is in "
                                    "compare.json)." if len(cmp.seeds) > 1 else ""),
                       health=health, comparable=cmp.comparable, notes=[*cmp.notes, *first.notes])
        csv = pd.concat([c.table.assign(seed=s) for s, c in cmp.per_seed.items()], ignore_index=True)
        payload = _seeds_payload(cmp)
    else:
        context, figures = _comparison_parts(cmp)
        csv, payload = cmp.table, _comparison_payload(cmp)
    payload = {**payload, "answer": cmp.answer}
    _write_outputs(out, figures, {"compare.csv": csv.to_csv(index=False),
                                  "compare.json": _json_text(payload),
                                  "compare.md": _render("compare.md.j2", context)},
                   _render("compare.html.j2", context))
    log.info("wrote comparison to %s", out)  # the answer is printed once, by the command
    return out
