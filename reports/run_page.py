"""The report of one run (:func:`write_report`): headline, pivot, figures, compute section, sanity checks and
appendix, rendered with the shared pieces of :mod:`reports.html` from the run's one analysis
(:func:`robustness.findings.run.analyse`: the comparison, the API and the pipeline read the same one)."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from attacks.base import COMPUTE, attacks_of_kind
from attacks.records import carried
from reports import plots, tables
from reports.html import FigureItem, TableItem, _json_text, _render, _sanity_rows, _write_outputs
from robustness import analysis
from robustness.findings.headline import RunHeadline
from robustness.findings.run import RunAnalysis, analyse
from robustness.core.norms import LINF, title_of
from robustness.core.rundir import RunDir
from robustness.results import RunResults
from robustness.sanity import Check, worst_status

log = logging.getLogger(__name__)

REPORT_SCHEMA = "dsn-robustness/report/v1"
NO_GATES = "not applicable: model has no gates"
NO_ATTACK = "not applicable: no white-box attack at eps > 0"


def _family_title(fam: Mapping[str, str]) -> str:
    return f"{fam['attack']} ({fam['backend']}, {fam['norm']}, gate_grad={fam['gate_grad']}, " \
           f"{fam['gate_mode']} gates, {fam['target']} head)"


def _accuracy_curves(records: pd.DataFrame | RunAnalysis) -> pd.DataFrame:
    """Robust accuracy per white-box accuracy attack at its strongest backend and routing gradient per sample, and
    the worst case (:attr:`RunAnalysis.accuracy_curves`), labelled for :func:`plots.plot_accuracy_curves`. Compute
    attacks are no robust accuracy (they have their own section); one line per attack, not per (backend,
    gradient): 4 routing gradients x 6 attacks made a legend taller than its panel (the appendix and the
    routing-gradient check keep the split). ``records`` alone are analysed in memory."""
    found = records if isinstance(records, RunAnalysis) else RunAnalysis(RunResults(Path(""), "", records))
    acc = found.accuracy_curves.copy()
    if acc.empty:
        return acc
    acc["label"] = ["worst case" if a == "worst" else str(a) for a in acc["attack"]]
    acc["panel"] = [f"{n}, {t} head, {m} gates" for n, t, m in zip(acc["norm"], acc["target"], acc["gate_mode"])]
    return acc


def _grad_curves(found: RunAnalysis) -> tuple[bytes | None, str]:
    """The figure of :attr:`RunAnalysis.robustness_curves`: one curve per routing gradient of the deployed gate
    mode plus their minimum ('any'), with the fixed-eps worst case as points."""
    curves = found.robustness_curves
    if curves is None:
        return None, "not applicable: no minimal-perturbation records (eps = inf)"
    png = plots.plot_robustness_curves(curves.curves, curves.fixed,
                                       title=f"Robustness curves ({curves.norm}, {curves.gate_mode} gates)")
    return png, "" if png is not None else "not applicable: no data to plot"


def _training_reason(run: RunResults) -> str:
    if run.metrics is None or run.metrics.empty:
        return "not applicable: the run directory has no metrics.csv (or it is empty)"
    return "not applicable: metrics.csv has none of the columns " + ", ".join(
        c for _, _, cols in plots.TRAINING_PANELS for c in cols)


def report_figures(found: RunAnalysis, summary: pd.DataFrame) -> list[FigureItem]:
    """The figures of a one-run report (each produced or with the reason it is not). The gate figures show
    :func:`analysis.primary_evaluation`'s family: the deployed (``hard``) forward of a gated model."""
    run, rec = found.run, found.records
    gated = found.gated
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
    curves_png, curves_reason = _grad_curves(found)
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
             lambda: plots.plot_accuracy_curves(_accuracy_curves(found)), needs_paths=False),
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
    return " · ".join(f"{title_of(n)} " + ", ".join(tables.eps_text(str(n), e) for e in sorted(per_norm[n]))
                      for n in sorted(per_norm.index, key=lambda n: (str(n) != LINF.name, str(n))))


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
    analysis: RunAnalysis | None = None  # what all of the above was read from

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
    the headline (:func:`robustness.findings.headline.run_headline`, also ``summary.json``'s ``headline``) and the
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
    found = analyse(run, zero_grad_share)  # the comparison page shows the same sanity verdicts for this run
    summary = found.summary(n_boot, seed)
    worst = found.worst_case
    rates = found.block_rates
    checks = list(found.checks)
    figures = report_figures(found, summary)
    meta = _metadata(run)
    headline = found.headline(n_boot, seed)
    scope = found.scope
    pivot = found.pivot
    gated = found.gated
    compute_attacks = found.compute_attacks
    compute_table, compute_figure = compute_section(run, scope, compute_attacks)

    where = f"{headline.target} head, {headline.gate_mode} gates" if gated else f"{headline.target} head"
    cascade = (" The attacks ran as a cascade (each on what those before it left robust, per routing gradient): an "
               "attack's number is the accuracy after it and the attacks before it." if carried(rec).any() else "")
    order = list(dict.fromkeys(str(e.get("attack")) for e in run.manifest.get("evaluations", [])))
    pivot_item = TableItem("Robust accuracy per attack and eps", tables.pivot_table(pivot, order),
                           f"{where}, white-box; each attack at its strongest backend and routing gradient per "
                           f"sample; '{analysis.WORST_ROW}' = robust only if every attack failed and no "
                           f"minimal-distance example fits inside eps. Intervals: "
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
    return RunReport(out, run, summary, worst, rates, checks, figures, headline, pivot, found)
