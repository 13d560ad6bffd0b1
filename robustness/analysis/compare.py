"""The verdict: is layer skipping more robust here?

:func:`compare_runs` splits loaded runs into (run, gate mode) variants and pairs them on their shared samples. The
verdict is eps-free where it can be: from each sample's minimal adversarial distance
(:mod:`robustness.analysis.distances`, the minimum over every minimal attack and routing gradient, so the adaptive
BPDA/STE/sharp/EOT attacks always count), the skipping variant is compared with each static (non-skipping) one by
the median per-sample distance ratio, the mean gap between their robustness curves and the difference where the
curves differ most, each with a paired-bootstrap interval, beside both clean accuracies. "No evidence" only when
every interval contains no difference. Runs without minimal-attack records fall back to the fixed-eps worst case
at the eps where the variants differ most, never at an eps where every variant is saturated (0% or its clean
accuracy). The reports only render the :class:`Comparison`.

This module is not re-exported by ``robustness.analysis``: it uses ``robustness.sanity``, which itself builds on
the analysis package.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from attacks.records import worst_case
from robustness.analysis.distances import (DISTANCE_KEYS, DistanceComparison, compare_distances,
                                           minimal_distances, robustness_curve)
from robustness.analysis.metrics import compute_saved, is_gated
from robustness.analysis.selection import accuracy_rows, strongest_per_sample, whitebox
from robustness.analysis.stats import PAIR_KEYS, paired_difference, wilson_interval
from robustness.analysis.transfer import transfer_matrix
from robustness.core.errors import RunDirError
from robustness.core.vocab import FORWARD_MODES, ROUTING_GRADIENTS, format_distance, format_eps
from robustness.results import RunResults
from robustness.sanity import Check, run_checks

log = logging.getLogger(__name__)

#: Order of a run's variants: the skipping modes first, the no-skip view (``open``) last.
VARIANT_ORDER: list[str] = [m for m in FORWARD_MODES if m != "open"] + ["open"]
NORM_NAMES = {"linf": "L-inf", "l2": "L2"}


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
        return compute_saved(whitebox(self.records), self.run.full_macs)

    @cached_property
    def minimal(self) -> pd.DataFrame:
        """This variant's minimal distances (:func:`distances.minimal_distances`), computed once."""
        return minimal_distances(self.records)

    def distances(self, norm: str, target: str) -> pd.DataFrame:
        """Minimal distances in ``norm`` for head ``target`` (minimum over attacks and routing gradients)."""
        d = self.minimal
        return d[(d["norm"] == norm) & (d["target"] == target)]


@dataclass
class Comparison:
    """Everything a comparison report shows (see :func:`compare_runs`)."""

    runs: list[RunResults]
    variants: list[Variant]
    common_attacks: list[str]
    table: pd.DataFrame        # variant, attack, norm, eps, target, n, robust_acc(+_low/_high), n_paired, diff(+...)
    differences: pd.DataFrame  # stats.paired_difference rows vs the reference, plus variant, reference
    pairs: list[dict[str, Any]]  # fixed-eps fallback: skipping variant vs each static variant where they differ most
    verdict: str               # the one line `dsn-robust run` ends with: the lead, then every pair's numbers
    lead: str                  # the verdict's first part (what the comparison page's box says above its table)
    distance_pairs: list[DistanceComparison]  # skipping variant vs each static variant, eps-free
    curves: pd.DataFrame       # distances.robustness_curve rows per variant (+ variant), the verdict's norm/head
    clean: pd.DataFrame        # variant, n, clean_acc(+_low/_high) of the verdict's head
    compute: pd.DataFrame      # variant, compute_saved, robust_acc, at
    transfer: pd.DataFrame     # transfer.transfer_matrix
    sanity: dict[str, list[Check]]
    notes: list[str]
    n_boot: int = 1000
    seed: int = 0

    @property
    def reference(self) -> Variant:
        return self.variants[0]

    @property
    def skipping(self) -> Variant | None:
        return next((v for v in self.variants if v.skipping), None)


def _variants(runs: Sequence[RunResults], labels: Sequence[str] | None) -> list[Variant]:
    out = []
    for i, run in enumerate(runs):
        base = labels[i] if labels else run.name
        rec = run.records
        modes = sorted(rec["gate_mode"].astype(str).unique(),
                       key=lambda m: (VARIANT_ORDER.index(m) if m in VARIANT_ORDER else 99, m))
        gated = is_gated(rec)
        for mode in modes:
            sub = rec[rec["gate_mode"] == mode]
            label = f"{base}({mode})" if gated or len(modes) > 1 else base
            out.append(Variant(label, run, mode, sub, is_gated(sub) and mode != "open"))
    return out


def _combined(v: Variant, common: Sequence[str]) -> pd.DataFrame:
    """The variant's white-box records of accuracy attacks (compute attacks have no robust accuracy), strongest
    per attack and sample, plus ``attack='worst'`` rows over the accuracy attacks every variant ran."""
    strong = strongest_per_sample(accuracy_rows(whitebox(v.records)))
    shared = strong[strong["attack"].isin(list(common))]
    parts = [strong] + ([worst_case(shared)] if len(shared) else [])
    return pd.concat(parts, ignore_index=True)


def _curves(label: str, combined: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for key, g in combined.groupby(PAIR_KEYS, sort=True, observed=True):
        iv = wilson_interval(int(g["robust"].sum()), len(g))
        rows.append(dict(variant=label, **dict(zip(PAIR_KEYS, key)), n=len(g), robust_acc=iv.estimate,
                         robust_acc_low=iv.low, robust_acc_high=iv.high))
    return pd.DataFrame(rows)


def _pick_setting(diff: pd.DataFrame) -> pd.Series | None:
    """The fixed-eps fallback's setting: fine head, linf first, among the worst-case rows at finite eps > 0 where
    the two variants are not both saturated (both at 0%, or both at the clean accuracy of eps 0), the eps with the
    largest absolute difference; None when every eps is saturated."""
    d = diff[(diff["attack"] == "worst") & (diff["eps"] > 0) & np.isfinite(diff["eps"])]
    if d.empty:
        return None
    if (d["target"] == "fine").any():
        d = d[d["target"] == "fine"]
    norm = "linf" if (d["norm"] == "linf").any() else str(d["norm"].iloc[0])
    d = d[(d["norm"] == norm) & ~((d["acc_a"] == 0) & (d["acc_b"] == 0))]
    if d.empty:
        return None
    return d.loc[d["diff"].abs().idxmax()]


_LEAD = {"more": "Skipping is more robust here", "less": "Skipping is less robust here",
         "none": "No evidence that skipping changes robustness", "mixed": "Mixed evidence"}


def _distance_clause(p: DistanceComparison) -> str:
    fmt = lambda v: format_distance(v, p.norm)  # noqa: E731
    ratio = (f"median distance ratio {p.ratio.estimate:.2f} [{p.ratio.low:.2f}, {p.ratio.high:.2f}] "
             f"(medians {fmt(p.median_a.estimate)} vs {fmt(p.median_b.estimate)}, Wilcoxon p={p.wilcoxon_p:.2g}, "
             f"n={p.n_both_correct} correct on both)" if p.n_both_correct else
             "no distance ratio (no sample is classified correctly by both)")
    return (f"{p.a} vs {p.b}: {ratio}, curves differ most at eps={fmt(p.eps_at)}: "
            f"{100 * p.acc_a_at:.1f}% vs {100 * p.acc_b_at:.1f}% ({100 * p.diff_at.estimate:+.1f} points "
            f"[{100 * p.diff_at.low:+.1f}, {100 * p.diff_at.high:+.1f}]), mean gap over eps <= {fmt(p.cap)} "
            f"{100 * p.gap.estimate:+.1f} points [{100 * p.gap.low:+.1f}, {100 * p.gap.high:+.1f}]; "
            f"clean {100 * p.clean_a.estimate:.1f}% vs {100 * p.clean_b.estimate:.1f}%")


_FINDINGS = {
    "more-distance": "more robust than {} (larger minimal distances per sample)",
    "less-distance": "less robust than {} (smaller minimal distances per sample)",
    "more-accuracy": "higher robust accuracy than {}, but not a larger median distance per sample",
    "less-accuracy": "lower robust accuracy than {}, but not a smaller median distance per sample",
    "mixed": "mixed evidence against {}",
    "none": "no evidence of a difference from {}",
}


def _distance_lead(skip: Variant, pairs: Sequence[DistanceComparison]) -> str:
    """The verdict's lead: per finding (:meth:`DistanceComparison.finding`) the static variants it holds for;
    "No evidence" only when every interval of every pair contains no difference."""
    found: dict[str, list[str]] = {}
    for p in pairs:
        found.setdefault(p.finding(), []).append(p.b)
    if set(found) == {"none"}:
        return _LEAD["none"]
    order = [k for k in _FINDINGS if k in found]
    return f"Skipping ({skip.label}): " + "; ".join(_FINDINGS[k].format(", ".join(found[k])) for k in order)


def _lead(kinds: set[str]) -> str:
    kinds = set(kinds)
    if len(kinds) == 1:
        return _LEAD[kinds.pop()]
    return _LEAD["mixed"] if "mixed" in kinds or {"more", "less"} <= kinds else (
        f"{_LEAD['more' if 'more' in kinds else 'less']} against some static variants")


def _verdict(pairs: list[dict[str, Any]], distance_pairs: list[DistanceComparison], skip: Variant | None,
             statics: list[Variant]) -> str:
    """One line: is skipping more robust here? "No evidence" only when every interval contains no difference."""
    if skip is None:
        return "Cannot tell: no variant skips layers (a gated model in a mode other than open)."
    if not statics:
        return f"Cannot tell: no static (non-skipping) variant to compare {skip.label} against."
    grads = sorted(set(whitebox(skip.records)["gate_grad"].astype(str)) & set(ROUTING_GRADIENTS))
    if distance_pairs:
        norm = distance_pairs[0].norm
        what = (f"minimal {NORM_NAMES.get(norm, norm)} distance per sample, minimum over attacks and routing "
                f"gradients (none{'/' + '/'.join(grads) if grads else ''})")
        return f"{_distance_lead(skip, distance_pairs)} ({what}): " + "; ".join(_distance_clause(p)
                                                                               for p in distance_pairs)
    if not pairs:
        return (f"Cannot tell: {skip.label} and the static variants share no minimal-distance records and no "
                "fixed-eps attack at an eps where they are not all at 0%; rerun the attack with --eps auto")
    what = f"worst-case (incl. {'/'.join(grads)})" if grads else "worst-case"
    clauses = [f"{p['a']} vs {p['b']} {what} robust acc at eps={format_eps(p['eps'])} (where they differ most) "
               f"differs by {100 * p['diff']:+.1f} points [{100 * p['diff_low']:+.1f}, {100 * p['diff_high']:+.1f}]"
               for p in pairs]
    kinds = {"more" if p["diff_low"] > 0 else "less" if p["diff_high"] < 0 else "none" for p in pairs}
    return f"{_lead(kinds)}: " + "; ".join(clauses)


def _compute_points(variants: Sequence[Variant], combined: Mapping[str, pd.DataFrame],
                    distances: Mapping[str, pd.DataFrame], distance_pairs: Sequence[DistanceComparison],
                    at: Mapping[str, Any] | None) -> pd.DataFrame:
    """Compute saved and robust accuracy per variant: on the robustness curve at the eps where the first verdict
    pair differs most, else the fixed-eps worst case at the fallback's setting."""
    points = []
    for v in variants:
        acc, where = float("nan"), "-"
        if distance_pairs:
            p = distance_pairs[0]
            d = distances.get(v.label)
            acc = float((d["distance"].to_numpy(float) > p.eps_at).mean()) if d is not None and len(d) else acc
            where = f"robustness curve, {p.norm} eps={format_distance(p.eps_at, p.norm)}"
        elif at is not None:
            c = combined[v.label]
            sel = c[(c["attack"] == "worst") & (c["norm"] == at["norm"]) & (c["eps"] == at["eps"])
                    & (c["target"] == at["target"])]
            acc = float(sel["robust"].mean()) if len(sel) else float("nan")
            where = f"worst case, {at['norm']} eps={format_eps(at['eps'])}"
        points.append({"variant": v.label, "compute_saved": v.compute_saved, "robust_acc": acc, "at": where})
    return pd.DataFrame(points, columns=["variant", "compute_saved", "robust_acc", "at"])


def _distance_setting(variants: Sequence[Variant]) -> tuple[str, str] | None:
    """(norm, head) the eps-free verdict speaks about: linf before l2, fine before coarse, among those every
    variant has minimal distances for; None when there is none."""
    have = None
    for v in variants:
        d = v.minimal
        keys = set(zip(d["norm"].astype(str), d["target"].astype(str)))
        have = keys if have is None else have & keys
    for norm in ("linf", "l2"):
        for head in ("fine", "coarse"):
            if have and (norm, head) in have:
                return norm, head
    return None


def _clean_accuracy(variants: Sequence[Variant], head: str) -> pd.DataFrame:
    """Clean accuracy of each variant's ``head`` on its white-box samples (one row per sample), Wilson interval."""
    rows = []
    for v in variants:
        wb = whitebox(v.records)
        wb = wb[wb["target"] == head].drop_duplicates("sample")
        iv = wilson_interval(int(wb["clean_correct"].sum()), len(wb))
        rows.append({"variant": v.label, "n": len(wb), "clean_acc": iv.estimate, "clean_acc_low": iv.low,
                     "clean_acc_high": iv.high})
    return pd.DataFrame(rows, columns=["variant", "n", "clean_acc", "clean_acc_low", "clean_acc_high"])


def _queries(run: RunResults) -> dict[str, int] | None:
    """The run's gradient-free query budget, keyed as the sanity checks read it."""
    q = run.gradient_free_queries
    return {run.name: q} if q is not None else None


def run_sanity(run: RunResults, zero_grad_share: float | Mapping[str, float] | None = None) -> list[Check]:
    """The gradient-masking checks of one run, as its report and every comparison show them: the one place that
    hands the run's zero-input-gradient share (measured by the attack run, in its manifest) and its gradient-free
    query budget to :func:`robustness.sanity.run_checks`, so both pages give the same verdicts.
    ``zero_grad_share`` replaces the manifest's measurement (a caller that measured it itself)."""
    share = run.zero_grad_share if zero_grad_share is None else zero_grad_share
    return run_checks(run.records, zero_grad_share=share, queries=_queries(run))


def compare_runs(runs: Sequence[RunResults], labels: Sequence[str] | None = None, *, n_boot: int = 1000,
                 seed: int = 0) -> Comparison:
    """Split loaded runs into (run, gate mode) variants and compare them on their shared samples.

    Raises ``RunDirError`` when no run is given or the label count does not match.
    """
    runs = list(runs)
    if not runs:
        raise RunDirError("a comparison needs at least one run directory")
    if labels is not None and len(labels) != len(runs):
        raise RunDirError(f"got {len(labels)} labels for {len(runs)} run directories")
    notes = []
    datasets = {(r.dataset_name, r.seed, r.n) for r in runs}
    if len(datasets) > 1:
        notes.append(f"The runs were attacked on different evaluation sets {sorted(map(str, datasets))}: pairing by "
                     "sample index may be meaningless.")
        log.warning(notes[-1])
    variants = _variants(runs, labels)
    common = sorted(set.intersection(*[set(accuracy_rows(whitebox(v.records))["attack"].astype(str))
                                       for v in variants]))
    combined = {v.label: _combined(v, common) for v in variants}
    ref = variants[0]

    curves = pd.concat([_curves(v.label, combined[v.label]) for v in variants], ignore_index=True)
    diff_cols = [*PAIR_KEYS, "n", "acc_a", "acc_b", "diff", "diff_low", "diff_high"]
    diffs = [paired_difference(combined[v.label], combined[ref.label], n_boot=n_boot, seed=seed)
             .assign(variant=v.label, reference=ref.label) for v in variants[1:]]
    diff = pd.concat(diffs, ignore_index=True) if diffs else pd.DataFrame(columns=[*diff_cols, "variant", "reference"])
    table = curves.merge(diff[["variant", *PAIR_KEYS, "n", "diff", "diff_low", "diff_high"]]
                         .rename(columns={"n": "n_paired"}), on=["variant", *PAIR_KEYS], how="left")

    skip = next((v for v in variants if v.skipping), None)
    statics = [v for v in variants if not v.skipping]
    pairs = []
    for s in statics if skip else []:
        d = paired_difference(combined[skip.label], combined[s.label], n_boot=n_boot, seed=seed)
        row = _pick_setting(d)
        if row is not None:
            pairs.append({"a": skip.label, "b": s.label, **{k: row[k] for k in d.columns}})

    setting = _distance_setting(variants)
    distances = {v.label: v.distances(*setting) for v in variants} if setting else {}
    distance_pairs = [p for p in (compare_distances(distances[skip.label], distances[s.label], skip.label, s.label,
                                                    n_boot=n_boot, seed=seed)
                                  for s in (statics if skip and setting else [])) if p is not None]
    curve_frames = [robustness_curve(d).assign(variant=label) for label, d in distances.items() if len(d)]
    curve_cols = ["variant", *DISTANCE_KEYS, "eps", "n", "robust_acc", "robust_acc_low", "robust_acc_high"]
    robustness = pd.concat(curve_frames, ignore_index=True)[curve_cols] if curve_frames else pd.DataFrame(
        columns=curve_cols)
    names = [labels[i] if labels else r.name for i, r in enumerate(runs)]
    verdict = _verdict(pairs, distance_pairs, skip, statics)
    return Comparison(runs=runs, variants=variants, common_attacks=common, table=table, differences=diff,
                      pairs=pairs, verdict=verdict,
                      lead=_distance_lead(skip, distance_pairs) if distance_pairs and skip else verdict,
                      distance_pairs=distance_pairs, curves=robustness,
                      clean=_clean_accuracy(variants, setting[1] if setting else "fine"),
                      compute=_compute_points(variants, combined, distances, distance_pairs,
                                              pairs[0] if pairs else None),
                      transfer=transfer_matrix([r.records for r in runs]),
                      sanity={name: run_sanity(r) for name, r in zip(names, runs)},
                      notes=notes,
                      n_boot=n_boot, seed=seed)
