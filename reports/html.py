"""Writing reports: one run (:func:`write_report`) and skip vs no-skip comparisons (:func:`write_comparison`).

Each report is a self-contained ``index.html`` (figures as base64 ``data:`` URIs, inline CSS, no external
references), a Markdown twin with figures under ``figures/``, a CSV and a versioned JSON. Every file is written
atomically; ``index.html`` is written last.
"""
from __future__ import annotations

import base64
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from attacks.records import worst_case
from reports import plots, tables
from reports.load import RunResults, load_run
from robustness import analysis
from robustness.core.errors import RunDirError
from robustness.core.rundir import RunDir, atomic_write, atomic_write_text
from robustness.sanity import Check, run_checks, worst_status

log = logging.getLogger(__name__)

REPORT_SCHEMA = "dsn-robustness/report/v1"
COMPARE_SCHEMA = "dsn-robustness/compare/v1"
NO_GATES = "not applicable: model has no gates"
NO_ATTACK = "not applicable: no white-box attack at eps > 0"
_GATE_MODE_ORDER = ["hard", "soft", "random", "frozen", "open"]
_REFERENCE_EPS = {"linf": 8 / 255, "l2": 0.5}


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


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN/NA as null, infinities as "inf"/"-inf", numpy scalars as Python and frames as row lists."""
    if isinstance(obj, pd.DataFrame):
        return [jsonable(r) for r in obj.to_dict(orient="records")]
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Check):
        return obj.as_dict()
    if obj is None or obj is pd.NA:
        return None
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return None if math.isnan(x) else ("inf" if x == math.inf else "-inf" if x == -math.inf else x)
    if isinstance(obj, Path):
        return str(obj)
    return obj if isinstance(obj, str) else str(obj)


def _json_text(payload: Mapping[str, Any]) -> str:
    return json.dumps(jsonable(payload), indent=2, allow_nan=False) + "\n"


def _eps_list(df: pd.DataFrame) -> list[float]:
    return sorted(float(e) for e in df["eps"].unique()) if len(df) else []


def _dataset_name(manifest: Mapping[str, Any]) -> str:
    ds = manifest.get("dataset")
    return str(ds.get("name", "")) if isinstance(ds, Mapping) else str(ds or "")


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
        slow = analysis.select(rec, {"attack": "slowdown", "norm": fam["norm"], "gate_mode": fam["gate_mode"]})
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
    m, rec = run.manifest, run.records
    return {"run": run.name, "model": run.model, "dataset": m.get("dataset", ""),
            "seed": m.get("seed", int(rec["seed"].iloc[0]) if len(rec) else None),
            "n": m.get("n", int(rec["sample"].nunique()) if len(rec) else 0),
            "eps": _eps_list(rec), "versions": m.get("versions", {}), "path_names": run.path_names,
            "full_macs": run.full_macs}


def write_report(run_dir: str | Path, out_dir: str | Path | None = None, *, n_boot: int = 1000, seed: int = 0,
                 zero_grad_share: float | dict[str, float] | None = None) -> Path:
    """Write the report of ``run_dir`` to ``out_dir`` (default ``RUN_DIR/report``) and return that directory.

    Files: ``index.html``, ``report.md``, ``figures/*.png``, ``summary.csv``, ``summary.json``. Raises
    ``RunDirError`` when the run directory is missing or holds no attack records.
    """
    run = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else RunDir.at(run_dir).report
    rec = run.records
    log.info("report for %s: %d records", run.name, len(rec))
    summary = analysis.summarize(rec, run.full_macs, run.fine_to_coarse, n_boot=n_boot, seed=seed)
    worst = analysis.worst_case_accuracy(rec)
    rates = analysis.block_rates(rec, run.path_names)
    if zero_grad_share is None and run.manifest.get("zero_grad_share") is not None:
        zero_grad_share = run.manifest["zero_grad_share"]
    checks = run_checks(rec, zero_grad_share=zero_grad_share)
    figures = report_figures(run, summary)
    meta = _metadata(run)

    gated = analysis.is_gated(rec)
    tables_top = [TableItem("Summary per evaluation", tables.summary_table(summary),
                            "Success rate, P(success | path change), AUROC and frozen-path survival are over "
                            "initially-correct samples; intervals are 95% (Wilson or bootstrap)."),
                  TableItem("Worst case over attacks", tables.worst_case_table(worst),
                            "A sample counts as robust only if every white-box attack failed on it.")]
    tables_bottom = [TableItem("Per-block execution and flip rates", tables.flip_table(rates),
                               "Flip rates are shares of all samples.", collapsed=True) if gated else
                     TableItem("Per-block execution and flip rates", pd.DataFrame(), NO_GATES),
                     TableItem("Evaluations (attacks manifest)",
                               tables.evaluations_table(run.manifest.get("evaluations") or []))]
    last = tables.metrics_table(run.metrics)
    if last is not None:
        tables_bottom.append(TableItem("Training: last epoch", last))

    context = {"run": run.name, "model": meta["model"], "dataset": _dataset_name(run.manifest) or tables.DASH,
               "seed": meta["seed"], "n": meta["n"], "eps": [tables.format_eps(e) for e in meta["eps"]],
               "checks": checks, "overall": _overall(checks), "tables_top": tables_top,
               "tables_bottom": tables_bottom, "figures": figures, "versions": meta["versions"] or {},
               "bootstrap": {"n": n_boot, "seed": seed}}
    payload = {"schema": REPORT_SCHEMA, **meta, "evaluations": run.manifest.get("evaluations", []),
               "bootstrap": {"n": n_boot, "seed": seed, "confidence": 0.95},
               "figures": {f.name: (f.file if f.produced else None) for f in figures},
               "summary": summary, "worst_case": worst,
               "sanity": [{"name": c.name, "status": c.status, "evidence": c.evidence} for c in checks]}
    html_text = _render("report.html.j2", context)
    _write_outputs(out, figures, {
        "summary.csv": summary.to_csv(index=False),
        "summary.json": _json_text(payload),
        "report.md": _render("report.md.j2", context),
    }, html_text)
    log.info("wrote report to %s", out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Comparison of runs
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Variant:
    """One (run, gate mode) of a comparison."""

    label: str
    run: RunResults
    gate_mode: str
    records: pd.DataFrame
    skipping: bool

    @property
    def compute_saved(self) -> float:
        """1 - mean clean MACs / full MACs on this variant's white-box records (NaN without full_macs)."""
        return analysis.compute_saved(analysis.whitebox(self.records), self.run.full_macs)


def _variants(runs: Sequence[RunResults], labels: Sequence[str] | None) -> list[Variant]:
    out = []
    for i, run in enumerate(runs):
        base = labels[i] if labels else run.name
        rec = run.records
        modes = sorted(rec["gate_mode"].astype(str).unique(),
                       key=lambda m: (_GATE_MODE_ORDER.index(m) if m in _GATE_MODE_ORDER else 99, m))
        gated = analysis.is_gated(rec)
        for mode in modes:
            sub = rec[rec["gate_mode"] == mode]
            label = f"{base}({mode})" if gated or len(modes) > 1 else base
            out.append(Variant(label, run, mode, sub, analysis.is_gated(sub) and mode != "open"))
    return out


def _combined(v: Variant, common: Sequence[str]) -> pd.DataFrame:
    """The variant's white-box records, strongest per attack and sample, plus ``attack='worst'`` rows over the
    attacks every variant ran."""
    strong = analysis.strongest_per_sample(analysis.whitebox(v.records))
    shared = strong[strong["attack"].isin(list(common))]
    parts = [strong] + ([worst_case(shared)] if len(shared) else [])
    return pd.concat(parts, ignore_index=True)


def _curves(label: str, combined: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for key, g in combined.groupby(analysis.PAIR_KEYS, sort=True, observed=True):
        iv = analysis.wilson_interval(int(g["adv_correct"].sum()), len(g))
        rows.append(dict(variant=label, **dict(zip(analysis.PAIR_KEYS, key)), n=len(g), robust_acc=iv.estimate,
                         robust_acc_low=iv.low, robust_acc_high=iv.high))
    return pd.DataFrame(rows)


def _pick_setting(diff: pd.DataFrame) -> pd.Series | None:
    """The row of a worst-case paired-difference table the verdict speaks about: fine head, linf first, eps closest
    to the usual budget (8/255 linf, 0.5 l2)."""
    d = diff[(diff["attack"] == "worst") & (diff["eps"] > 0) & np.isfinite(diff["eps"])]
    if d.empty:
        return None
    if (d["target"] == "fine").any():
        d = d[d["target"] == "fine"]
    norm = "linf" if (d["norm"] == "linf").any() else str(d["norm"].iloc[0])
    d = d[d["norm"] == norm]
    ref = _REFERENCE_EPS.get(norm, float(d["eps"].max()))
    return d.loc[(np.log(d["eps"]) - math.log(ref)).abs().idxmin()]


def _verdict(pairs: list[dict[str, Any]], skip: Variant | None, statics: list[Variant]) -> str:
    """One line: is skipping more robust here? An interval that contains 0 is "no evidence"."""
    if skip is None:
        return "Cannot tell: no variant skips layers (a gated model in a mode other than open)."
    if not statics:
        return f"Cannot tell: no static (non-skipping) variant to compare {skip.label} against."
    if not pairs:
        return f"Cannot tell: {skip.label} and the static variants share no attack on the same samples at eps > 0."
    grads = sorted(set(analysis.whitebox(skip.records)["gate_grad"].astype(str)) & {"ste", "bpda", "eot"})
    what = f"worst-case (incl. {'/'.join(grads)})" if grads else "worst-case"
    clauses = [f"{p['a']} vs {p['b']} {what} robust acc at eps={tables.format_eps(p['eps'])} differs by "
               f"{100 * p['diff']:+.1f} points [{100 * p['diff_low']:+.1f}, {100 * p['diff_high']:+.1f}]"
               for p in pairs]
    kinds = {"more" if p["diff_low"] > 0 else "less" if p["diff_high"] < 0 else "none" for p in pairs}
    lead = {"more": "Skipping is more robust here", "less": "Skipping is less robust here",
            "none": "No evidence that skipping helps"}[kinds.pop()] if len(kinds) == 1 else "Mixed evidence"
    return f"{lead}: " + "; ".join(clauses)


@dataclass
class Comparison:
    """Everything a comparison report shows (see :func:`compare_runs`)."""

    runs: list[RunResults]
    variants: list[Variant]
    common_attacks: list[str]
    table: pd.DataFrame        # variant, attack, norm, eps, target, n, robust_acc(+_low/_high), n_paired, diff(+...)
    differences: pd.DataFrame  # analysis.paired_difference rows vs the reference, plus variant, reference
    pairs: list[dict[str, Any]]  # skipping variant vs each static variant at the verdict's setting
    verdict: str
    compute: pd.DataFrame      # variant, compute_saved, robust_acc, at
    transfer: pd.DataFrame     # analysis.transfer_matrix
    sanity: dict[str, list[Check]]
    notes: list[str]

    @property
    def reference(self) -> Variant:
        return self.variants[0]

    @property
    def skipping(self) -> Variant | None:
        return next((v for v in self.variants if v.skipping), None)


def _compute_points(variants: Sequence[Variant], combined: Mapping[str, pd.DataFrame],
                    at: Mapping[str, Any] | None) -> pd.DataFrame:
    """Compute saved and worst-case robust accuracy (at the verdict's setting) per variant."""
    points = []
    for v in variants:
        acc = float("nan")
        if at is not None:
            c = combined[v.label]
            sel = c[(c["attack"] == "worst") & (c["norm"] == at["norm"]) & (c["eps"] == at["eps"])
                    & (c["target"] == at["target"])]
            acc = float(sel["adv_correct"].mean()) if len(sel) else float("nan")
        points.append({"variant": v.label, "compute_saved": v.compute_saved, "robust_acc": acc,
                       "at": f"worst case, {at['norm']} eps={tables.format_eps(at['eps'])}" if at else "-"})
    return pd.DataFrame(points, columns=["variant", "compute_saved", "robust_acc", "at"])


def compare_runs(run_dirs: Sequence[str | Path], labels: Sequence[str] | None = None, *, n_boot: int = 1000,
                 seed: int = 0) -> Comparison:
    """Load the runs, split them into (run, gate mode) variants and compare them on their shared samples.

    Raises ``RunDirError`` for a missing run, one without attack records, or a label count that does not match.
    """
    if not run_dirs:
        raise RunDirError("a comparison needs at least one run directory")
    if labels is not None and len(labels) != len(run_dirs):
        raise RunDirError(f"got {len(labels)} labels for {len(run_dirs)} run directories")
    runs = [load_run(d) for d in run_dirs]
    notes = []
    datasets = {(_dataset_name(r.manifest), r.manifest.get("seed"), r.manifest.get("n")) for r in runs}
    if len(datasets) > 1:
        notes.append(f"The runs were attacked on different evaluation sets {sorted(map(str, datasets))}: pairing by "
                     "sample index may be meaningless.")
        log.warning(notes[-1])
    variants = _variants(runs, labels)
    common = sorted(set.intersection(*[set(analysis.whitebox(v.records)["attack"].astype(str)) for v in variants]))
    combined = {v.label: _combined(v, common) for v in variants}
    ref = variants[0]

    curves = pd.concat([_curves(v.label, combined[v.label]) for v in variants], ignore_index=True)
    diff_cols = [*analysis.PAIR_KEYS, "n", "acc_a", "acc_b", "diff", "diff_low", "diff_high"]
    diffs = [analysis.paired_difference(combined[v.label], combined[ref.label], n_boot=n_boot, seed=seed)
             .assign(variant=v.label, reference=ref.label) for v in variants[1:]]
    diff = pd.concat(diffs, ignore_index=True) if diffs else pd.DataFrame(columns=[*diff_cols, "variant", "reference"])
    table = curves.merge(diff[["variant", *analysis.PAIR_KEYS, "n", "diff", "diff_low", "diff_high"]]
                         .rename(columns={"n": "n_paired"}), on=["variant", *analysis.PAIR_KEYS], how="left")

    skip = next((v for v in variants if v.skipping), None)
    statics = [v for v in variants if not v.skipping]
    pairs = []
    for s in statics if skip else []:
        d = analysis.paired_difference(combined[skip.label], combined[s.label], n_boot=n_boot, seed=seed)
        row = _pick_setting(d)
        if row is not None:
            pairs.append({"a": skip.label, "b": s.label, **{k: row[k] for k in d.columns}})
    names = [labels[i] if labels else r.name for i, r in enumerate(runs)]
    return Comparison(runs=runs, variants=variants, common_attacks=common, table=table, differences=diff,
                      pairs=pairs, verdict=_verdict(pairs, skip, statics),
                      compute=_compute_points(variants, combined, pairs[0] if pairs else None),
                      transfer=analysis.transfer_matrix([r.records for r in runs]),
                      sanity={name: run_checks(r.records) for name, r in zip(names, runs)}, notes=notes)


def write_comparison(run_dirs: Sequence[str | Path], out_dir: str | Path, labels: Sequence[str] | None = None, *,
                     n_boot: int = 1000, seed: int = 0) -> Path:
    """Compare runs (and the gate modes inside them) on the same samples; write ``out_dir`` and return it.

    Files: ``index.html``, ``compare.md``, ``figures/*.png``, ``compare.csv`` (robust accuracy per variant, attack and
    eps with the paired difference to the first variant), ``compare.json`` (schema ``dsn-robustness/compare/v1``,
    with the one-line ``verdict``). Raises ``RunDirError`` for a missing run or one without attack records.
    """
    out = Path(out_dir)
    cmp = compare_runs(run_dirs, labels, n_boot=n_boot, seed=seed)
    ref, skip = cmp.reference, cmp.skipping
    verdict_note = (f"Worst case = per sample, over the attacks every variant ran "
                    f"({', '.join(cmp.common_attacks) or 'none'}), each at its strongest backend and routing gradient "
                    "(BPDA/STE/EOT count when present). Differences are in percentage points with paired-bootstrap "
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
               "notes": cmp.notes, "bootstrap": {"n": n_boot, "seed": seed}}
    payload = {
        "schema": COMPARE_SCHEMA, "verdict": cmp.verdict, "reference": ref.label,
        "skipping_variant": skip.label if skip else None, "verdict_pairs": cmp.pairs,
        "common_attacks": cmp.common_attacks,
        "variants": [{"label": v.label, "run": v.run.name, "path": str(v.run.path), "model": v.run.model,
                      "gate_mode": v.gate_mode, "skipping": v.skipping, "dataset": v.run.manifest.get("dataset"),
                      "seed": v.run.manifest.get("seed"), "n": v.run.manifest.get("n"),
                      "full_macs": v.run.full_macs, "compute_saved": v.compute_saved,
                      "versions": v.run.manifest.get("versions", {}),
                      "evaluations": v.run.manifest.get("evaluations", [])} for v in cmp.variants],
        "eps": sorted({e for r in cmp.runs for e in _eps_list(r.records)}),
        "bootstrap": {"n": n_boot, "seed": seed, "confidence": 0.95},
        "robust_accuracy": cmp.table, "paired_differences": cmp.differences, "transfer": cmp.transfer,
        "compute": cmp.compute,
        "sanity": {k: [{"name": c.name, "status": c.status, "evidence": c.evidence} for c in v]
                   for k, v in cmp.sanity.items()},
        "notes": cmp.notes,
    }
    _write_outputs(out, figures, {"compare.csv": cmp.table.to_csv(index=False), "compare.json": _json_text(payload),
                                  "compare.md": _render("compare.md.j2", context)},
                   _render("compare.html.j2", context))
    log.info("wrote comparison to %s: %s", out, cmp.verdict)
    return out
