"""Writing reports: one run (:func:`write_report`) and a skip vs no-skip comparison (:func:`write_comparison`).

Rendering only: the run comes loaded (``robustness.results``), the verdict comes computed
(``robustness.analysis.compare``). Each report is a self-contained ``index.html`` (figures as base64 ``data:``
URIs, inline CSS, no external references), a Markdown twin with figures under ``figures/``, a CSV and a versioned
JSON. Every file is written atomically; ``index.html`` is written last.
"""
from __future__ import annotations

import base64
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from attacks.base import COMPUTE, attacks_of_kind
from reports import plots, tables
from robustness import analysis
from robustness.analysis.compare import Comparison
from robustness.core.rundir import RunDir, atomic_write, atomic_write_text
from robustness.core.runtime import jsonable
from robustness.core.vocab import format_eps
from robustness.results import RunResults
from robustness.sanity import Check, run_checks, worst_status

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
    """Figures, then the text files, then ``index.html`` — each atomically; stale figures are removed."""
    fig_dir = out / "figures"
    for f in figures:
        target = out / f.file
        if f.png is not None:
            atomic_write(target, lambda tmp, data=f.png: tmp.write_bytes(data))
        else:
            target.unlink(missing_ok=True)
    for name, text in texts.items():
        atomic_write_text(out / name, text)
    atomic_write_text(out / "index.html", html)
    if fig_dir.is_dir() and not any(fig_dir.iterdir()):
        fig_dir.rmdir()


# ---------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------

def _family_title(fam: Mapping[str, str]) -> str:
    return f"{fam['attack']} ({fam['backend']}, {fam['norm']}, gate_grad={fam['gate_grad']}, " \
           f"{fam['gate_mode']} gates, {fam['target']} head)"


def _accuracy_curves(records: pd.DataFrame) -> pd.DataFrame:
    """Robust accuracy per white-box evaluation and the worst case, labelled for :func:`plots.plot_accuracy_curves`."""
    acc = analysis.robust_accuracy_table(analysis.whitebox(records))
    if acc.empty:
        return acc
    several_backends = acc.loc[acc["attack"] != "worst", "backend"].nunique() > 1
    acc["label"] = [("worst case" if a == "worst" else f"{a} ({b + ', ' if several_backends else ''}{g})")
                    for a, b, g in zip(acc["attack"], acc["backend"], acc["gate_grad"])]
    acc["panel"] = [f"{n}, {t} head, {m} gates" for n, t, m in zip(acc["norm"], acc["target"], acc["gate_mode"])]
    return acc


def report_figures(run: RunResults, summary: pd.DataFrame) -> list[FigureItem]:
    """The figures of a one-run report (each produced or with the reason it is not)."""
    rec = run.records
    gated = analysis.is_gated(rec)
    fam = analysis.primary_evaluation(rec)
    fam_rec = analysis.select(rec, fam) if fam else rec.iloc[:0]
    fam_title = _family_title(fam) if fam else ""

    def slot(name: str, title: str, caption: str, make, needs_paths: bool = True) -> FigureItem:
        if needs_paths and not gated:
            return FigureItem(name, title, caption, None, NO_GATES)
        if needs_paths and not fam:
            return FigureItem(name, title, caption, None, NO_ATTACK)
        png = make()
        return FigureItem(name, title, caption, png, "" if png is not None else "not applicable: no data to plot")

    def macs() -> bytes | None:
        slow = analysis.select(rec, {"norm": fam["norm"], "gate_mode": fam["gate_mode"]})
        slow = slow[slow["attack"].isin(attacks_of_kind(COMPUTE))]
        if len(slow):
            best = slow.groupby("gate_grad", observed=True)["adv_macs"].mean().idxmax()
            slow = slow[slow["gate_grad"] == best]
        return plots.plot_macs(fam_rec, slow, run.full_macs, title=f"Compute under {fam_title}")

    return [
        slot("robust_accuracy", "Robust accuracy vs eps",
             "Accuracy of the attacked head per attack (backend, routing gradient); dashed black: per-sample worst "
             "case over all attacks; bands: 95% Wilson; eps = inf is not drawn.",
             lambda: plots.plot_accuracy_curves(_accuracy_curves(rec)), needs_paths=False),
        slot("flip_heatmap", "Per-block flip rates", f"Share of samples whose gate flipped, {fam_title}.",
             lambda: plots.plot_flip_heatmap(analysis.block_rates(fam_rec[fam_rec["eps"] > 0], run.path_names),
                                             title=fam_title)),
        slot("hamming_by_success", "Hamming distance by attack outcome",
             f"Gates flipped between clean and adversarial path, initially-correct samples, {fam_title}.",
             lambda: plots.plot_hamming_by_success(fam_rec, title=fam_title)),
        slot("macs", "Compute: clean vs attacked vs slowdown",
             "Mean executed MACs per sample; dashed: every block executed.", macs),
        slot("success_by_path_change", "Success with vs without path change",
             f"Attack success among initially-correct samples, 95% Wilson intervals, {fam_title}.",
             lambda: plots.plot_success_by_path_change(analysis.select(summary, fam), title=fam_title)),
    ]


def _overall(checks: Sequence[Check]) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in ("pass", "warn", "skip")}
    return f"{worst_status(checks).upper()} ({counts['pass']} pass, {counts['warn']} warn, {counts['skip']} skip)"


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
    figures: list[FigureItem]

    @property
    def index(self) -> Path:
        """The report's ``index.html``."""
        return self.out / "index.html"


def write_report(run: RunResults, out_dir: str | Path | None = None, *, n_boot: int = 1000, seed: int = 0,
                 zero_grad_share: float | dict[str, float] | None = None) -> RunReport:
    """Write the report of a loaded run to ``out_dir`` (default ``RUN_DIR/report``) and return what it computed.

    Files: ``index.html``, ``report.md``, ``figures/*.png``, ``summary.csv``, ``summary.json``.
    """
    out = Path(out_dir) if out_dir is not None else RunDir.at(run.path).report
    rec = run.records
    log.info("report for %s: %d records", run.name, len(rec))
    summary = analysis.summarize(rec, run.full_macs, run.fine_to_coarse, n_boot=n_boot, seed=seed)
    worst = analysis.worst_case_accuracy(rec)
    rates = analysis.block_rates(rec, run.path_names)
    if zero_grad_share is None:
        zero_grad_share = run.zero_grad_share
    queries = run.gradient_free_queries
    checks = run_checks(rec, zero_grad_share=zero_grad_share,
                        queries={run.name: queries} if queries is not None else None)
    figures = report_figures(run, summary)
    meta = _metadata(run)

    gated = analysis.is_gated(rec)
    tables_top = [TableItem("Summary per evaluation", tables.summary_table(summary),
                            "Success rate, P(success | path change), AUROC and frozen-path survival are over "
                            "initially-correct samples; intervals are 95% (Wilson or bootstrap)."),
                  TableItem("Worst case over attacks", tables.worst_case_table(worst),
                            "A sample counts as robust only if it is correct on the clean input and every "
                            "white-box attack, under every routing gradient, failed on it: the number to trust."),
                  TableItem("Attack strength", tables.strength_table(run.evaluations, run.surrogate_fidelity),
                            "Effort per evaluation; surrogate fidelity = share of (first-batch) samples on which "
                            "the network the attacker differentiates predicts what the deployed one does; a "
                            "minimal-norm attack has converged when it found an adversarial example for >= 99% "
                            "of the clean-correct samples.")]
    tables_bottom = [TableItem("Per-block execution and flip rates", tables.flip_table(rates),
                               "Flip rates are shares of all samples.", collapsed=True) if gated else
                     TableItem("Per-block execution and flip rates", pd.DataFrame(), NO_GATES),
                     TableItem("Evaluations (attacks manifest)",
                               tables.evaluations_table(run.evaluations))]
    last = tables.metrics_table(run.metrics)
    if last is not None:
        tables_bottom.append(TableItem("Training: last epoch", last))

    context = {"run": run.name, "model": meta["model"], "dataset": run.dataset_name or tables.DASH,
               "seed": meta["seed"], "n": meta["n"], "eps": [format_eps(e) for e in meta["eps"]],
               "checks": checks, "overall": _overall(checks), "tables_top": tables_top,
               "tables_bottom": tables_bottom, "figures": figures, "versions": meta["versions"] or {},
               "bootstrap": {"n": n_boot, "seed": seed}}
    payload = {"schema": REPORT_SCHEMA, **meta, "evaluations": run.evaluations,
               "bootstrap": {"n": n_boot, "seed": seed, "confidence": 0.95},
               "figures": {f.name: (f.file if f.produced else None) for f in figures},
               "summary": summary, "worst_case": worst, "sanity": _sanity_rows(checks)}
    html_text = _render("report.html.j2", context)
    _write_outputs(out, figures, {
        "summary.csv": summary.to_csv(index=False),
        "summary.json": _json_text(payload),
        "report.md": _render("report.md.j2", context),
    }, html_text)
    log.info("wrote report to %s", out)
    return RunReport(out, run, summary, worst, rates, checks, figures)


# ---------------------------------------------------------------------------------------------------------------
# Comparison of runs
# ---------------------------------------------------------------------------------------------------------------

def _comparison_payload(cmp: Comparison) -> dict[str, Any]:
    ref, skip = cmp.reference, cmp.skipping
    return {
        "schema": COMPARE_SCHEMA, "verdict": cmp.verdict, "reference": ref.label,
        "skipping_variant": skip.label if skip else None, "verdict_pairs": cmp.pairs,
        "common_attacks": cmp.common_attacks,
        "variants": [{"label": v.label, "run": v.run.name, "path": str(v.run.path), "model": v.run.model,
                      "gate_mode": v.gate_mode, "skipping": v.skipping, "dataset": v.run.dataset,
                      "seed": v.run.seed, "n": v.run.n,
                      "full_macs": v.run.full_macs, "compute_saved": v.compute_saved,
                      "versions": v.run.versions,
                      "evaluations": v.run.evaluations} for v in cmp.variants],
        "eps": sorted({e for r in cmp.runs for e in r.eps}),
        "bootstrap": {"n": cmp.n_boot, "seed": cmp.seed, "confidence": 0.95},
        "robust_accuracy": cmp.table, "paired_differences": cmp.differences, "transfer": cmp.transfer,
        "compute": cmp.compute,
        "sanity": {k: _sanity_rows(v) for k, v in cmp.sanity.items()},
        "notes": cmp.notes,
    }


def write_comparison(cmp: Comparison, out_dir: str | Path) -> Path:
    """Write a comparison (``robustness.analysis.compare.compare_runs``) to ``out_dir`` and return that directory.

    Files: ``index.html``, ``compare.md``, ``figures/*.png``, ``compare.csv`` (robust accuracy per variant, attack and
    eps with the paired difference to the first variant), ``compare.json`` (schema ``dsn-robustness/compare/v1``,
    with the one-line ``verdict``).
    """
    out = Path(out_dir)
    ref = cmp.reference
    verdict_note = (f"Worst case = per sample, over the attacks every variant ran "
                    f"({', '.join(cmp.common_attacks) or 'none'}), each at its strongest backend and routing gradient "
                    "(STE/BPDA/sharp/EOT count when present). Differences are in percentage points with "
                    "paired-bootstrap "
                    "95% intervals over shared samples; an interval containing 0 is no evidence either way.")
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
    tables_ = [TableItem("Robust accuracy and paired difference to " + ref.label, tables.comparison_table(cmp.table),
                         "Δ = variant − reference on the samples both evaluated, percentage points."),
               TableItem("Compute", tables.compute_table(cmp.compute)),
               TableItem("Transfer (source → target)", tables.transfer_table(cmp.transfer),
                         "" if len(cmp.transfer) else "No transfer records (source_run != '').")]
    context = {"variants": cmp.variants, "reference": ref.label, "verdict": cmp.verdict,
               "verdict_note": verdict_note, "sanity": cmp.sanity, "tables": tables_, "figures": figures,
               "notes": cmp.notes, "bootstrap": {"n": cmp.n_boot, "seed": cmp.seed}}
    _write_outputs(out, figures, {"compare.csv": cmp.table.to_csv(index=False),
                                  "compare.json": _json_text(_comparison_payload(cmp)),
                                  "compare.md": _render("compare.md.j2", context)},
                   _render("compare.html.j2", context))
    log.info("wrote comparison to %s: %s", out, cmp.verdict)
    return out
