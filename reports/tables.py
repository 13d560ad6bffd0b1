"""Display tables (strings, human column names) built from the analysis frames, and their Markdown/HTML renderings.

The numeric tables live in ``robustness.analysis``; the functions here only select, label and format them, so the
Markdown and HTML reports show exactly the same cells.
"""
from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from robustness.core.vocab import format_eps

DASH = "–"


def _missing(x: object) -> bool:
    return x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))


def pct(x: float, digits: int = 1) -> str:
    """A fraction as a percentage string; a dash when undefined."""
    return DASH if _missing(x) else f"{100 * float(x):.{digits}f}%"


def pct_ci(x: float, low: float, high: float) -> str:
    """``45.2% [40.1, 50.3]``; the interval is left out when undefined."""
    if _missing(x):
        return DASH
    if _missing(low) or _missing(high):
        return pct(x)
    return f"{pct(x)} [{100 * low:.1f}, {100 * high:.1f}]"


def num(x: float, digits: int = 2) -> str:
    """A number with ``digits`` decimals; a dash when undefined."""
    return DASH if _missing(x) else f"{float(x):.{digits}f}"


def num_ci(x: float, low: float, high: float, digits: int = 2) -> str:
    """``0.62 [0.55, 0.70]``; the interval is left out when undefined."""
    if _missing(x):
        return DASH
    if _missing(low) or _missing(high):
        return num(x, digits)
    return f"{num(x, digits)} [{num(low, digits)}, {num(high, digits)}]"


def points_ci(diff: float, low: float, high: float) -> str:
    """A difference of fractions in percentage points: ``+0.4 [-1.2, +2.0]``."""
    if _missing(diff):
        return DASH
    ci = "" if _missing(low) or _missing(high) else f" [{100 * low:+.1f}, {100 * high:+.1f}]"
    return f"{100 * diff:+.1f}{ci}"


def _drop_constant(df: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Drop the given columns when they hold one value only (they say nothing in a table)."""
    drop = [c for c in columns if c in df.columns and df[c].astype(str).nunique() <= 1 and len(df) > 0]
    return df.drop(columns=drop)


def _ci(row: pd.Series, name: str, fmt=pct_ci) -> str:
    return fmt(row.get(name), row.get(f"{name}_low"), row.get(f"{name}_high"))


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluation (from ``analysis.summarize``): clean and robust accuracy, success rate, path and
    compute change, and how path change relates to success."""
    sup = "same_superclass" if "same_superclass" in summary.columns else "same_superclass_proxy"
    rows = []
    for _, r in summary.iterrows():
        rows.append({
            "Attack": r["attack"], "Backend": r["backend"], "Norm": r["norm"], "eps": format_eps(r["eps"]),
            "Gate mode": r["gate_mode"], "Gate grad": r["gate_grad"], "Target": r["target"],
            "Source": DASH if _missing(r["source_run"]) or not r["source_run"] else r["source_run"],
            "n": str(int(r["n"])),
            "Clean acc": pct(r["clean_acc"]), "Robust acc": pct(r["robust_acc"]),
            "Success rate": pct(r["success_rate"]), "Mean Hamming": num(r["hamming_mean"]),
            "ΔMACs %": num(r["dmacs_pct"], 1),
            "P(success | path changed)": _ci(r, "p_success_changed"),
            "P(success | path unchanged)": _ci(r, "p_success_unchanged"),
            "AUROC (Hamming)": _ci(r, "auroc_hamming", num_ci),
            "Frozen-path survival": _ci(r, "frozen_survival"),
            ("In true superclass" if sup == "same_superclass" else "In true superclass (coarse-head proxy)"):
                _ci(r, sup) if sup in r else DASH,
        })
    return _drop_constant(pd.DataFrame(rows), ["Backend", "Norm", "Gate mode", "Target", "Source"])


def worst_case_table(worst: pd.DataFrame) -> pd.DataFrame:
    """Worst case over attacks per eps (from ``analysis.worst_case_accuracy``)."""
    rows = [{"Norm": r["norm"], "eps": format_eps(r["eps"]), "Gate mode": r["gate_mode"], "Target": r["target"],
             "n": str(int(r["n"])), "Clean acc": pct(r["clean_acc"]),
             "Worst-case robust acc": _ci(r, "robust_acc"), "Attacks pooled": r["attacks"]}
            for _, r in worst.iterrows()]
    return _drop_constant(pd.DataFrame(rows), ["Norm", "Gate mode", "Target"])


def flip_table(rates: pd.DataFrame) -> pd.DataFrame:
    """Per-block execution and flip rates (from ``analysis.block_rates``)."""
    rows = [{"Attack": r["attack"], "Backend": r["backend"], "Norm": r["norm"], "eps": format_eps(r["eps"]),
             "Gate mode": r["gate_mode"], "Gate grad": r["gate_grad"], "Target": r["target"], "Block": r["block"],
             "Executed (clean)": pct(r["clean_rate"]), "Executed (adv)": pct(r["adv_rate"]),
             "Flip 0→1": pct(r["flip_01"]), "Flip 1→0": pct(r["flip_10"])}
            for _, r in rates.iterrows()]
    return _drop_constant(pd.DataFrame(rows), ["Backend", "Norm", "Gate mode", "Target"])


def evaluations_table(evaluations: Sequence[dict]) -> pd.DataFrame:
    """The manifest's evaluations: id, eps list and attack configuration."""
    rows = []
    for e in evaluations:
        config = e.get("config") or {}
        rows.append({"Evaluation": str(e.get("id", "")),
                     "eps": ", ".join(format_eps(x) for x in e.get("eps") or []),
                     "Config": ", ".join(f"{k}={v}" for k, v in config.items()) or DASH,
                     "Complete": "yes" if e.get("complete", True) else "NO"})
    return pd.DataFrame(rows, columns=["Evaluation", "eps", "Config", "Complete"])


def _budget(config: dict) -> str:
    """An attack's effort in words, from its manifest config (steps, restarts, losses, queries)."""
    parts = []
    if config.get("queries"):
        parts.append(f"{config['queries']} queries")
    elif config.get("steps"):
        parts.append(f"{config['steps']} steps")
    if config.get("binary_steps") and not config.get("queries"):
        parts.append(f"{config['binary_steps']} search steps")
    if int(config.get("restarts", 1) or 1) > 1:
        parts.append(f"{config['restarts']} restarts")
    losses = config.get("losses")
    if losses:
        parts.append("losses " + "+".join(str(v) for v in losses))
    return " x ".join(parts) if parts else DASH


def _convergence(note: dict | None) -> str:
    if not note:
        return DASH
    share = note.get("share_found")
    share_text = f"{100 * share:.0f}%" if isinstance(share, (int, float)) else "?"
    verdict = "converged" if note.get("converged") else "NOT converged: its L2 accuracies are upper bounds"
    median = note.get("median_norm")
    median_text = f", median norm {median:.3g}" if isinstance(median, (int, float)) else ""
    return f"found {note.get('found')}/{note.get('clean_correct')} ({share_text}){median_text}; {verdict}"


def strength_table(evaluations: Sequence[dict], fidelity: dict[str, float]) -> pd.DataFrame:
    """What each evaluation could do: its effort, the fidelity of its routing gradient's surrogate (share of
    first-batch samples on which the surrogate predicts what the deployed model does) and, for a minimal-norm
    attack, whether it converged."""
    rows = []
    for e in evaluations:
        if e.get("source_run"):
            continue
        key = f"{e.get('gate_mode')}/{e.get('gate_grad')}"
        effort = "1 step" if e.get("kind") == "single-step" else _budget(e.get("config") or {})
        rows.append({"Attack": str(e.get("attack", "")), "Kind": str(e.get("kind") or DASH),
                     "Backend": str(e.get("backend", "")), "Norm": str(e.get("norm", "")),
                     "Gates": str(e.get("gate_mode", "")), "Routing grad": str(e.get("gate_grad", "")),
                     "Effort": effort,
                     "Surrogate fidelity": f"{100 * fidelity[key]:.0f}%" if key in fidelity else DASH,
                     "Convergence": _convergence(e.get("convergence"))})
    columns = ["Attack", "Kind", "Backend", "Norm", "Gates", "Routing grad", "Effort", "Surrogate fidelity",
               "Convergence"]
    return _drop_constant(pd.DataFrame(rows, columns=columns), ["Norm", "Gates", "Convergence", "Surrogate fidelity"])


def metrics_table(metrics: pd.DataFrame | None) -> pd.DataFrame | None:
    """The last epoch of the training metrics, one row per metric (None without metrics)."""
    if metrics is None or metrics.empty:
        return None
    values = [metrics[c].iloc[-1] for c in metrics.columns]
    return pd.DataFrame({"Metric": [str(c) for c in metrics.columns],
                         "Last epoch": [f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v) for v in values]})


def comparison_table(table: pd.DataFrame) -> pd.DataFrame:
    """Robust accuracy per variant and attack and eps, with the paired difference to the reference variant."""
    rows = [{"Variant": r["variant"], "Attack": r["attack"], "Norm": r["norm"], "eps": format_eps(r["eps"]),
             "Target": r["target"], "n": str(int(r["n"])), "Robust acc": _ci(r, "robust_acc"),
             "Paired n": DASH if _missing(r.get("n_paired")) else str(int(r["n_paired"])),
             "Δ vs reference (points)": points_ci(r.get("diff"), r.get("diff_low"), r.get("diff_high"))}
            for _, r in table.iterrows()]
    return _drop_constant(pd.DataFrame(rows), ["Norm", "Target"])


def transfer_table(matrix: pd.DataFrame) -> pd.DataFrame:
    """Success rate of examples crafted on a source run against a target run (from ``analysis.transfer_matrix``)."""
    rows = [{"Attack": r["attack"], "Norm": r["norm"], "eps": format_eps(r["eps"]), "Source": r["source_run"],
             "Target run": r["run"], "Gate mode": r["gate_mode"], "Kind": "white-box" if r["whitebox"] else "transfer",
             "Success rate": pct(r["success_rate"]), "Initially correct": str(int(r["n_clean_correct"]))}
            for _, r in matrix.iterrows()]
    return _drop_constant(pd.DataFrame(rows), ["Norm", "Gate mode"])


def compute_table(points: pd.DataFrame) -> pd.DataFrame:
    """Compute saved and robust accuracy per variant."""
    rows = [{"Variant": r["variant"], "Compute saved": pct(r["compute_saved"]),
             "Robust acc": pct(r["robust_acc"]), "At": r["at"]} for _, r in points.iterrows()]
    return pd.DataFrame(rows, columns=["Variant", "Compute saved", "Robust acc", "At"])


def _md_cell(x: object) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``df``'s cells (no index)."""
    if df is None or df.empty:
        return "_(empty)_"
    header = "| " + " | ".join(_md_cell(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_md_cell(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def to_html(df: pd.DataFrame) -> str:
    """An HTML ``<table>`` of ``df``'s cells (escaped, no index)."""
    if df is None or df.empty:
        return "<p><em>(empty)</em></p>"
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in row) + "</tr>"
                   for row in df.itertuples(index=False))
    return f'<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
