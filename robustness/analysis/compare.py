"""The verdict: is layer skipping more robust here?

:func:`compare_runs` splits loaded runs into (run, gate mode) variants, pairs them on their shared samples and
attacks, and says in one line whether the skipping variant's worst-case robust accuracy differs from each static
(non-skipping) variant's: an interval that contains 0 is "no evidence". The reports only render the
:class:`Comparison`.

This module is not re-exported by ``robustness.analysis``: it uses ``robustness.sanity``, which itself builds on
the analysis package.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from attacks.records import worst_case
from robustness.analysis.metrics import compute_saved, is_gated
from robustness.analysis.selection import accuracy_rows, strongest_per_sample, whitebox
from robustness.analysis.stats import PAIR_KEYS, paired_difference, wilson_interval
from robustness.analysis.transfer import transfer_matrix
from robustness.core.errors import RunDirError
from robustness.core.vocab import FORWARD_MODES, ROUTING_GRADIENTS, format_eps
from robustness.results import RunResults
from robustness.sanity import Check, run_checks

log = logging.getLogger(__name__)

#: Order of a run's variants: the skipping modes first, the no-skip view (``open``) last.
VARIANT_ORDER: list[str] = [m for m in FORWARD_MODES if m != "open"] + ["open"]
#: The usual budget per norm; the verdict speaks about the eps closest to it.
REFERENCE_EPS: dict[str, float] = {"linf": 8 / 255, "l2": 0.5}


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


@dataclass
class Comparison:
    """Everything a comparison report shows (see :func:`compare_runs`)."""

    runs: list[RunResults]
    variants: list[Variant]
    common_attacks: list[str]
    table: pd.DataFrame        # variant, attack, norm, eps, target, n, robust_acc(+_low/_high), n_paired, diff(+...)
    differences: pd.DataFrame  # stats.paired_difference rows vs the reference, plus variant, reference
    pairs: list[dict[str, Any]]  # skipping variant vs each static variant at the verdict's setting
    verdict: str
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
    """The variant's white-box records, strongest per attack and sample, plus ``attack='worst'`` rows over the
    accuracy attacks every variant ran."""
    strong = strongest_per_sample(whitebox(v.records))
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
    """The row of a worst-case paired-difference table the verdict speaks about: fine head, linf first, eps closest
    to the usual budget (:data:`REFERENCE_EPS`)."""
    d = diff[(diff["attack"] == "worst") & (diff["eps"] > 0) & np.isfinite(diff["eps"])]
    if d.empty:
        return None
    if (d["target"] == "fine").any():
        d = d[d["target"] == "fine"]
    norm = "linf" if (d["norm"] == "linf").any() else str(d["norm"].iloc[0])
    d = d[d["norm"] == norm]
    ref = REFERENCE_EPS.get(norm, float(d["eps"].max()))
    return d.loc[(np.log(d["eps"]) - math.log(ref)).abs().idxmin()]


def _verdict(pairs: list[dict[str, Any]], skip: Variant | None, statics: list[Variant]) -> str:
    """One line: is skipping more robust here? An interval that contains 0 is "no evidence"."""
    if skip is None:
        return "Cannot tell: no variant skips layers (a gated model in a mode other than open)."
    if not statics:
        return f"Cannot tell: no static (non-skipping) variant to compare {skip.label} against."
    if not pairs:
        return f"Cannot tell: {skip.label} and the static variants share no attack on the same samples at eps > 0."
    grads = sorted(set(whitebox(skip.records)["gate_grad"].astype(str)) & set(ROUTING_GRADIENTS))
    what = f"worst-case (incl. {'/'.join(grads)})" if grads else "worst-case"
    clauses = [f"{p['a']} vs {p['b']} {what} robust acc at eps={format_eps(p['eps'])} differs by "
               f"{100 * p['diff']:+.1f} points [{100 * p['diff_low']:+.1f}, {100 * p['diff_high']:+.1f}]"
               for p in pairs]
    kinds = {"more" if p["diff_low"] > 0 else "less" if p["diff_high"] < 0 else "none" for p in pairs}
    lead = {"more": "Skipping is more robust here", "less": "Skipping is less robust here",
            "none": "No evidence that skipping helps"}[kinds.pop()] if len(kinds) == 1 else "Mixed evidence"
    return f"{lead}: " + "; ".join(clauses)


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
            acc = float(sel["robust"].mean()) if len(sel) else float("nan")
        points.append({"variant": v.label, "compute_saved": v.compute_saved, "robust_acc": acc,
                       "at": f"worst case, {at['norm']} eps={format_eps(at['eps'])}" if at else "-"})
    return pd.DataFrame(points, columns=["variant", "compute_saved", "robust_acc", "at"])


def _queries(run: RunResults) -> dict[str, int] | None:
    """The run's gradient-free query budget, keyed as the sanity checks read it."""
    q = run.gradient_free_queries
    return {run.name: q} if q is not None else None


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
    names = [labels[i] if labels else r.name for i, r in enumerate(runs)]
    return Comparison(runs=runs, variants=variants, common_attacks=common, table=table, differences=diff,
                      pairs=pairs, verdict=_verdict(pairs, skip, statics),
                      compute=_compute_points(variants, combined, pairs[0] if pairs else None),
                      transfer=transfer_matrix([r.records for r in runs]),
                      sanity={name: run_checks(r.records, queries=_queries(r)) for name, r in zip(names, runs)},
                      notes=notes,
                      n_boot=n_boot, seed=seed)
