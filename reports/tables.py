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

from attacks.base import KINDS, attack_kind, counts_for_accuracy
from robustness.findings.headline import RunHeadline
from robustness.analysis.pivot import WORST_ROW
from robustness.core.norms import LINF, title_of
from robustness.core.vocab import format_distance, format_eps

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


def eps_text(norm: str, eps: float) -> str:
    """An eps for a table cell in its norm's units (``format_eps``): L-inf as k/255, L2 (or a norm this version
    does not know) as a plain decimal (an L2 budget of 0.25 is no fraction of 255)."""
    return format_eps(float(eps), norm)


def distance(norm: str, d: float) -> str:
    """A perturbation size for display (``vocab.format_distance``: L-inf in units of 1/255, L2 with three
    significant digits); a dash when undefined."""
    return DASH if _missing(d) else format_distance(float(d), norm)


def distance_ci(norm: str, d: float, low: float, high: float) -> str:
    """``0.156 [0.140, 0.169]``; the interval is left out when undefined."""
    if _missing(d):
        return DASH
    if _missing(low) or _missing(high):
        return distance(norm, d)
    return f"{distance(norm, d)} [{distance(norm, low)}, {distance(norm, high)}]"


def _drop_constant(df: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Drop the given columns when they hold one value only (they say nothing in a table)."""
    drop = [c for c in columns if c in df.columns and df[c].astype(str).nunique() <= 1 and len(df) > 0]
    return df.drop(columns=drop)


def _ci(row: pd.Series, name: str, fmt=pct_ci) -> str:
    return fmt(row.get(name), row.get(f"{name}_low"), row.get(f"{name}_high"))


#: The summary table's superclass column per summary metric (``analysis.summary.same_superclass``).
SUPERCLASS_COLUMNS = {"same_superclass": "In true superclass",
                      "same_superclass_proxy": "In true superclass (coarse-head proxy)"}


def summary_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per evaluation (from ``analysis.summarize``): clean and robust accuracy, success rate, path and
    compute change, and how path change relates to success. Under the attack cascade an evaluation's robust
    accuracy and success rate include what the attacks before it found (:mod:`attacks.runner.cascade`); "Found
    itself" is the share it broke on its own (shown only when the cascade carried rows over)."""
    sup = "same_superclass" if "same_superclass" in summary.columns else "same_superclass_proxy"
    rows = []
    for _, r in summary.iterrows():
        rows.append({
            "Attack": r["attack"], "Backend": r["backend"], "Norm": r["norm"], "eps": eps_text(r["norm"], r["eps"]),
            "Gate mode": r["gate_mode"], "Gate grad": r["gate_grad"], "Target": r["target"],
            "Source": DASH if _missing(r["source_run"]) or not r["source_run"] else r["source_run"],
            "n": str(int(r["n"])),
            "Clean acc": pct(r["clean_acc"]),
            # a compute attack's ``robust`` column is no robust accuracy (it does not try to flip predictions)
            "Robust acc": pct(r["robust_acc"]) if counts_for_accuracy(str(r["attack"])) else DASH,
            "Success rate": pct(r["success_rate"]),
            "Found itself": pct(r["n_own_success"] / r["n_clean_correct"]) if r.get("n_clean_correct") else DASH,
            "Mean Hamming": num(r["hamming_mean"]),
            "ΔMACs %": num(r["dmacs_pct"], 1),
            "P(success | path changed)": _ci(r, "p_success_changed"),
            "P(success | path unchanged)": _ci(r, "p_success_unchanged"),
            "AUROC (Hamming)": _ci(r, "auroc_hamming", num_ci),
            "Frozen-path survival": _ci(r, "frozen_survival"),
            SUPERCLASS_COLUMNS[sup]: _ci(r, sup) if sup in r else DASH,
        })
    frame = pd.DataFrame(rows)
    if "n_own_success" not in summary.columns or (summary["n_own_success"] == summary["n_success"]).all():
        frame = frame.drop(columns=["Found itself"], errors="ignore")  # no cascade carried a row over
    single_head = "clean_acc_coarse" in summary.columns and summary["clean_acc_coarse"].isna().all()
    if single_head and len(summary) and summary.get(sup, pd.Series(dtype=float)).isna().all():
        # no coarse head and no label hierarchy: the superclass analysis was skipped (the sanity checks say so)
        frame = frame.drop(columns=[SUPERCLASS_COLUMNS[sup]], errors="ignore")
    return _drop_constant(frame, ["Backend", "Norm", "Gate mode", "Target", "Source"])


def headline_table(h: RunHeadline) -> list[dict[str, str]]:
    """The headline as rows of ``label``, ``value`` and ``detail`` (HTML and Markdown render exactly these)."""
    scope = f"{h.target} head, {h.gate_mode} gates" if h.gated else f"{h.target} head"
    rows = [{"label": "Clean accuracy", "value": pct_ci(h.clean.estimate, h.clean.low, h.clean.high),
             "detail": f"{scope}, n = {h.clean.n}"}]
    pooled = ""
    for r in h.robust:
        names = _pooled_text(r.attacks, r.within_budget)
        detail = (f"worst case per sample over {names} (every backend and routing gradient)"
                  if names != pooled else "worst case over the same attacks")
        pooled = names
        rows.append({"label": f"Robust accuracy at {title_of(r.norm)} eps = {eps_text(r.norm, r.eps)}",
                     "value": pct_ci(r.accuracy.estimate, r.accuracy.low, r.accuracy.high),
                     "detail": f"{detail}, n = {r.accuracy.n}"})
    for d in h.distances:
        label = f"Median minimal {title_of(d.norm)} distance"
        if d.median is None:
            rows.append({"label": label, "value": DASH, "detail": d.reason})
            continue
        iv = d.median
        tail = "; more than half were never fooled, so the median is unbounded" if math.isinf(iv.estimate) else ""
        rows.append({"label": label, "value": distance_ci(d.norm, iv.estimate, iv.low, iv.high),
                     "detail": f"over {d.clean_correct} clean-correct samples, {d.found} fooled by a minimal-norm "
                               f"attack{tail}"})
    rows.append({"label": "Compute saved", "value": pct(h.compute_saved) if not h.compute_reason else DASH,
                 "detail": h.compute_reason or f"1 - mean clean MACs / all-blocks MACs, {h.gate_mode} gates"})
    rows.append({"label": "Gradient masking checks", "value": h.masking.upper(),
                 "detail": ("warning: " + ", ".join(h.masking_warnings)) if h.masking_warnings else
                           "no check applied" if h.masking == "skip" else
                           f"no check warns; {h.masking_ran} of {h.masking_total} could run (the rest need attacks "
                           f"this run lacks: weak evidence)" if h.masking_ran * 2 < h.masking_total else
                           f"no check warns ({h.masking_ran} of {h.masking_total} ran)"})
    return rows


def _eps_column(norm: str, eps: float) -> str:
    return eps_text(norm, eps) if norm == LINF.name else f"{title_of(norm)} {eps_text(norm, eps)}"  # k/255 is L-inf


def _attack_order(name: str, order: Sequence[str] = ()) -> tuple[int, int, str]:
    if name == WORST_ROW:
        return len(KINDS) + 1, 0, name
    kind = attack_kind(name)
    return (KINDS.index(kind) if kind in KINDS else len(KINDS)), (list(order).index(name) if name in order
                                                                  else len(order)), name


def pivot_table(pivot: pd.DataFrame, order: Sequence[str] = ()) -> pd.DataFrame:
    """Attack x eps robust accuracy (from ``analysis.accuracy_pivot``): one row per attack by kind (single-step,
    iterative, gradient-free, minimal), within a kind in ``order`` (the run's: under the attack cascade each row
    holds the finds of the rows above it), the worst case last; L-inf columns by eps, then L2 columns
    (``L2 0.5``)."""
    if pivot is None or pivot.empty:
        return pd.DataFrame()
    norm_rank = {"linf": 0, "l2": 1}
    columns = sorted({(str(n), float(e)) for n, e in zip(pivot["norm"], pivot["eps"])},
                     key=lambda c: (norm_rank.get(c[0], 2), c[0], c[1]))
    cells = {(str(r["attack"]), str(r["norm"]), float(r["eps"])): r["robust_acc"] for _, r in pivot.iterrows()}
    rows = []
    for attack in sorted(set(pivot["attack"].astype(str)), key=lambda name: _attack_order(name, order)):
        row = {"Attack": attack}
        for norm, eps in columns:
            row[_eps_column(norm, eps)] = pct(cells.get((attack, norm, eps), float("nan")))
        rows.append(row)
    return pd.DataFrame(rows)


def compute_attack_display(table: pd.DataFrame) -> pd.DataFrame:
    """Per compute attack and eps (from ``analysis.compute_attack_table``): mean MACs clean / attacked / all
    blocks (millions) and the share of the saved compute the attack takes back."""
    rows = [{"Attack": r["attack"], "Norm": r["norm"], "eps": eps_text(r["norm"], r["eps"]), "n": str(int(r["n"])),
             "MACs clean (M)": num(r["clean_macs"] / 1e6, 2), "MACs attacked (M)": num(r["adv_macs"] / 1e6, 2),
             "MACs all blocks (M)": num(r["full_macs"] / 1e6, 2),
             "Saved compute taken back": pct(r["taken_back"])} for _, r in table.iterrows()]
    return _drop_constant(pd.DataFrame(rows), ["Norm"])


def _pooled_text(attacks: str, within_budget: str) -> str:
    """The attacks a worst case pools; the minimal-distance ones whose examples fit inside the budget named as
    such (they break samples at a fixed eps without being run at it)."""
    text = attacks.replace(",", ", ")
    return f"{text} and the examples of {within_budget.replace(',', ', ')} within eps" if within_budget else text


def worst_case_table(worst: pd.DataFrame) -> pd.DataFrame:
    """Worst case over attacks per eps (from ``analysis.worst_case_accuracy``)."""
    rows = [{"Norm": r["norm"], "eps": eps_text(r["norm"], r["eps"]), "Gate mode": r["gate_mode"],
             "Target": r["target"], "n": str(int(r["n"])), "Clean acc": pct(r["clean_acc"]),
             "Worst-case robust acc": _ci(r, "robust_acc"),
             "Attacks pooled": r["attacks"] + (f" + {r['within_budget']} (within eps)" if r["within_budget"]
                                                else "")}
            for _, r in worst.iterrows()]
    return _drop_constant(pd.DataFrame(rows), ["Norm", "Gate mode", "Target"])


def flip_table(rates: pd.DataFrame) -> pd.DataFrame:
    """Per-block execution and flip rates (from ``analysis.block_rates``)."""
    rows = [{"Attack": r["attack"], "Backend": r["backend"], "Norm": r["norm"], "eps": eps_text(r["norm"], r["eps"]),
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
                     "eps": ", ".join(eps_text(str(e.get("norm", "linf")), x) for x in e.get("eps") or []),
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
    """Robust accuracy per variant and attack and eps, with the paired difference to the reference variant (compute
    attacks left out: they have no robust accuracy)."""
    table = table[[a == "worst" or counts_for_accuracy(str(a)) for a in table["attack"]]] if len(table) else table
    rows = [{"Variant": r["variant"], "Attack": r["attack"], "Norm": r["norm"], "eps": eps_text(r["norm"], r["eps"]),
             "Target": r["target"], "n": str(int(r["n"])), "Robust acc": _ci(r, "robust_acc"),
             "Paired n": DASH if _missing(r.get("n_paired")) else str(int(r["n_paired"])),
             "Δ vs reference (points)": points_ci(r.get("diff"), r.get("diff_low"), r.get("diff_high"))}
            for _, r in table.iterrows()]
    return _drop_constant(pd.DataFrame(rows), ["Norm", "Target"])


def transfer_table(matrix: pd.DataFrame) -> pd.DataFrame:
    """Success rate of examples crafted on a source run against a target run (from ``analysis.transfer_matrix``)."""
    rows = [{"Attack": r["attack"], "Norm": r["norm"], "eps": eps_text(r["norm"], r["eps"]), "Source": r["source_run"],
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


def verdict_table(pairs: Sequence, verdicts: Sequence | None = None) -> pd.DataFrame:
    """The eps-free verdict per pair (``robustness.analysis.distances.DistanceComparison``): clean accuracy of
    each side, median minimal distances, their per-sample ratio and its Wilcoxon test (what the finding rests on),
    the curves' largest difference and mean gap (details), and the finding of each pair's ``verdicts`` entry
    (``robustness.analysis.verdict.PairVerdict``; without one, the pair's own :meth:`verdict`)."""
    rows = []
    found = {(v.a, v.b): v for v in verdicts or []}
    for p in pairs:
        def d(v: float) -> str:
            return distance(p.norm, v)
        verdict = found.get((p.a, p.b)) or p.verdict()
        rows.append({
            "skipping vs static": f"{p.a} vs {p.b}",
            "clean acc": f"{pct(p.clean_a.estimate)} vs {pct(p.clean_b.estimate)}",
            "median distance": f"{d(p.median_a.estimate)} vs {d(p.median_b.estimate)}",
            "distance ratio (median)": num_ci(p.ratio.estimate, p.ratio.low, p.ratio.high),
            "Wilcoxon p": f"{p.wilcoxon_p:.2g}",
            "n correct on both": str(p.n_both_correct),
            "largest curve difference": f"{pct(p.acc_a_at)} vs {pct(p.acc_b_at)} at eps={d(p.eps_at)}: "
                                        + points_ci(p.diff_at.estimate, p.diff_at.low, p.diff_at.high),
            "mean curve gap": f"{points_ci(p.gap.estimate, p.gap.low, p.gap.high)} (eps ≤ {d(p.cap)})",
            "finding": verdict.finding,
        })
    return pd.DataFrame(rows)


def pair_verdict_table(verdicts: Sequence) -> pd.DataFrame:
    """One row per ``robustness.analysis.verdict.PairVerdict``: the pair, its finding, and the effect, test and
    negligible band it rests on."""
    return pd.DataFrame([{"skipping vs static": f"{v.a} vs {v.b}", "finding": v.finding,
                          "evidence": v.evidence or DASH} for v in verdicts],
                        columns=["skipping vs static", "finding", "evidence"])


def pooled_table(pooled: Sequence) -> pd.DataFrame:
    """The seed-pooled verdict per pair (``robustness.findings.seeds.PooledPair``): pooled ratio with its
    hierarchical-bootstrap interval, the interval the samples alone would give, the seed-level test, samples,
    finding."""
    rows = []
    for p in pooled:
        rows.append({"skipping vs static": f"{p.a} vs {p.b}", "seeds": ", ".join(str(s) for s in p.seeds),
                     "pooled distance ratio (median)": num_ci(p.ratio.estimate, p.ratio.low, p.ratio.high),
                     "samples-only interval": (f"[{p.samples_only.low:.2f}, {p.samples_only.high:.2f}]"
                                               if p.samples_only is not None else DASH),
                     "test": f"{p.test.name} p={p.test.p:.2g}" + (f" ({p.test.note})" if p.test.note else ""),
                     "n correct on both": str(p.n), "finding": p.verdict.finding})
    return pd.DataFrame(rows)


def seed_table(pooled: Sequence, clean: pd.DataFrame) -> pd.DataFrame:
    """Per seed and pair (``robustness.findings.seeds.PooledPair``), side by side: each model's clean accuracy
    (``clean``: seed, variant, clean_acc), the seed's own distance ratio with its interval, its Wilcoxon p and
    its own finding."""
    rows = []
    acc = {(int(s), str(v)): a for s, v, a in zip(clean["seed"], clean["variant"], clean["clean_acc"])}
    variants = list(dict.fromkeys(str(v) for v in clean["variant"]))
    for p in pooled:
        for s in p.seeds:
            iv = p.seed_intervals.get(s)
            row = {"seed": str(s), "pair": f"{p.a} vs {p.b}"}
            row.update({f"clean {v}": pct(acc.get((s, v), float("nan"))) for v in variants})
            row["distance ratio (median)"] = num_ci(iv.estimate, iv.low, iv.high) if iv is not None else DASH
            row["Wilcoxon p"] = f"{p.seed_p[s]:.2g}" if s in p.seed_p else DASH
            row["finding"] = p.seed_findings.get(s, DASH)
            rows.append(row)
    return pd.DataFrame(rows)


def clean_table(clean: pd.DataFrame) -> pd.DataFrame:
    """Clean accuracy per variant with its Wilson interval."""
    return pd.DataFrame({"variant": clean["variant"], "n": clean["n"],
                         "clean accuracy": [pct_ci(a, lo, hi) for a, lo, hi in
                                            zip(clean["clean_acc"], clean["clean_acc_low"], clean["clean_acc_high"])]})
