"""The comparison of runs (:func:`write_comparison`): the skipping variant against the static ones, one seed or
pooled over training seeds, rendered with the shared pieces of :mod:`reports.html`."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reports import plots, tables
from reports.html import FigureItem, TableItem, _json_text, _render, _sanity_rows, _write_outputs
from robustness.analysis import verdict as verdict_rule
from robustness.findings.compare import Comparison
from robustness.findings.seeds import SeedComparison
from robustness.sanity import Check

log = logging.getLogger(__name__)

COMPARE_SCHEMA = "dsn-robustness/compare/v1"


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
    """Write a comparison (``robustness.findings.compare.compare_runs``, or ``compare_seeds`` for seed-replicated
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
