"""The verdict: is layer skipping more robust here?

:func:`compare_runs` splits loaded runs into (run, gate mode) variants and pairs them on their shared samples. The
verdict is eps-free where it can be: from each sample's minimal adversarial distance
(:mod:`robustness.analysis.distances`, the minimum over every minimal attack and routing gradient, so the adaptive
BPDA/STE/sharp/EOT attacks always count), the skipping variant is compared with each static (non-skipping) one by
the median per-sample distance ratio and its Wilcoxon signed-rank test; the curves' mean gap and largest difference
stay in the details. Runs without minimal-attack records fall back to the fixed-eps worst case at the eps where the
variants differ most (its interval re-selects that eps in every resample, its exact McNemar test is Bonferroni-
corrected for the choice), never at an eps where both variants are saturated (0%, or their clean accuracy).

Every pair's finding comes from one rule (:mod:`robustness.analysis.verdict`): "more / less robust" needs a
significant paired test and an interval outside the negligible band; a pair is "confounded by clean accuracy" when
a side is near chance or far below its twin, and "not comparable" when it has too few samples correct on both, a
side is at chance level on clean data (not significantly above 1 / fine classes by a one-sided binomial test), or
the sides saw different images (subset hashes, sample counts) or data (``config.json`` data options, the attack
manifests' ``data`` / ``dataset`` entries). Runs of one training seed each: the verdict says its interval covers
test samples only. :func:`robustness.findings.seeds.compare_seeds` pools seed-replicated runs (hierarchical
bootstrap over seeds and samples, a seed-level sign-flip test). The reports only render the :class:`Comparison`
/ ``SeedComparison``.

The pair guards (training health, same samples) are :mod:`robustness.findings.comparability`, the fixed-eps
fallback :mod:`robustness.findings.fixed_eps`, the verdict line's text :mod:`robustness.findings.compare_text`;
the variant type they all read :mod:`robustness.findings.variant`.

This module is not re-exported by ``robustness.analysis``: it uses ``robustness.sanity``, which itself builds on
the analysis package.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from attacks.records import worst_case
from robustness.findings.answer import short_answer
from robustness.findings.comparability import _health, _health_checks, _same_samples
from robustness.findings.compare_text import (_cannot_tell, _distance_clause, _fixed_clause, _fixed_what, distance_what,
                                              routing_grads)
from robustness.analysis.distances import DISTANCE_KEYS, DistanceComparison, compare_distances, robustness_curve
from robustness.findings.fixed_eps import _fixed_eps_effect, _fixed_eps_pair
from robustness.analysis.metrics import is_gated
from robustness.findings.run import analyse
from robustness.analysis.selection import accuracy_rows, strongest_per_sample, whitebox
from robustness.analysis.stats import PAIR_KEYS, paired_difference, wilson_interval
from robustness.analysis.transfer import transfer_matrix
from robustness.findings.variant import Variant
from robustness.analysis.verdict import Health, PairVerdict, judge, lead, seeds_scope
from robustness.core.errors import RunDirError
from robustness.core.norms import NORM_NAMES
from robustness.core.vocab import FORWARD_MODES, format_distance, format_eps
from robustness.results import RunResults
from robustness.sanity import Check

log = logging.getLogger(__name__)

#: Order of a run's variants: the skipping modes first, the no-skip view (``open``) last.
VARIANT_ORDER: list[str] = [m for m in FORWARD_MODES if m != "open"] + ["open"]


class Findings:
    """What a comparison and its seed-pooled form both answer, from their ``verdicts`` (one per pair) and
    ``verdict`` (the long form)."""

    verdicts: list[PairVerdict]
    verdict: str

    def _refused(self, kind: str) -> list[str]:
        return [f"{v.a} vs {v.b}: {v.finding}" for v in self.verdicts if v.kind == kind]

    @property
    def confounded(self) -> list[str]:
        """``a vs b: confounded by clean accuracy (...)`` for every pair the health guard refuses."""
        return self._refused("confounded")

    @property
    def not_comparable(self) -> list[str]:
        """``a vs b: not comparable: ...`` for every pair with too few shared samples or different images/data."""
        return self._refused("not-comparable")

    @property
    def comparable(self) -> bool:
        """No pair is confounded or not comparable (what ``dsn-robust compare --strict`` requires)."""
        return not (self.confounded or self.not_comparable)

    @property
    def answer(self) -> str:
        """The short answer (at most 200 characters, :mod:`robustness.findings.answer`): what ``dsn-robust run``
        and ``compare`` print; ``verdict`` is the long form."""
        return short_answer(self.verdicts, self.verdict)


@dataclass
class Comparison(Findings):
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
    verdicts: list[PairVerdict] = field(default_factory=list)  # one per pair, by the rule of analysis.verdict
    health: list[Check] = field(default_factory=list)          # training health + same samples, per pair
    setting: tuple[str, str] | None = None                     # (norm, head) of the eps-free verdict
    scope: str = ""                                            # what the intervals cover (one training seed)

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
            where = f"worst case, {at['norm']} eps={format_eps(at['eps'], str(at['norm']))}"
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
    for norm in NORM_NAMES:
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


def compare_runs(runs: Sequence[RunResults], labels: Sequence[str] | None = None, *, n_boot: int = 1000,
                 seed: int = 0) -> Comparison:
    """Split loaded runs into (run, gate mode) variants and compare them on their shared samples.

    Each pair (the skipping variant against each static one) gets one :class:`~robustness.analysis.verdict.
    PairVerdict` by the rule of :mod:`robustness.analysis.verdict`; the runs are taken as one training seed each,
    so the verdict says its interval covers test samples only. Raises ``RunDirError`` when no run is given or the
    label count does not match.
    """
    runs = list(runs)
    if not runs:
        raise RunDirError("a comparison needs at least one run directory")
    if labels is not None and len(labels) != len(runs):
        raise RunDirError(f"got {len(labels)} labels for {len(runs)} run directories")
    notes: list[str] = [f"{run.name}: {run.incomplete_line}" for run in runs if not run.complete]
    for note in notes:
        log.warning(note)
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
    scope = seeds_scope(1)
    pairs = [fp for fp in (_fixed_eps_pair(skip, s, combined[skip.label], combined[s.label], n_boot, seed)
                           for s in (statics if skip else [])) if fp is not None]

    setting = _distance_setting(variants)
    distances = {v.label: v.distances(*setting) for v in variants} if setting else {}
    distance_pairs: list[DistanceComparison] = []
    verdicts: list[PairVerdict] = []
    clauses: list[str] = []
    judged: list[tuple[PairVerdict, tuple[Health, Health], int | None, list[str]]] = []
    for s in statics if skip else []:
        reasons = _same_samples(skip, s)
        if setting:
            p = compare_distances(distances[skip.label], distances[s.label], skip.label, s.label,
                                  n_boot=n_boot, seed=seed)
            if p is None:
                v = judge(skip.label, s.label, None, None, samples=[*reasons, f"{skip.label} and {s.label} share "
                                                                   "no attacked sample"], scope=scope)
                clauses.append(f"{v.a} vs {v.b}: {v.finding}")
            else:
                health = (_health(skip, p.clean_a.estimate), _health(s, p.clean_b.estimate))
                v = p.verdict(health, reasons, scope)
                distance_pairs.append(p)
                clauses.append(_distance_clause(p, v))
                judged.append((v, health, p.n_both_correct, reasons))
            verdicts.append(v)
            continue
        fp = next((q for q in pairs if q["b"] == s.label), None)
        if fp is None:
            v = PairVerdict(skip.label, s.label, "inconclusive", "no minimal distances, and at every fixed eps both "
                            "are saturated (0% or their clean accuracy); rerun the attack with --eps auto",
                            scope=scope)
            clauses.append(f"{v.a} vs {v.b}: {v.finding}")
        else:
            health = (_health(skip, fp["clean_a"]), _health(s, fp["clean_b"]))
            effect, test = _fixed_eps_effect(fp, _fixed_what(skip))
            v = judge(skip.label, s.label, effect, test, health=health, n_both_correct=fp["n_both_correct"],
                      samples=reasons, scope=scope)
            clauses.append(_fixed_clause(fp, v))
            judged.append((v, health, fp["n_both_correct"], reasons))
        verdicts.append(v)

    cannot = _cannot_tell(skip, statics)
    if cannot is not None:
        verdict = lead_text = cannot
    elif not setting and not pairs:
        verdict = lead_text = (f"Cannot tell: {skip.label} and the static variants share no minimal-distance "
                               "records and no fixed-eps attack at an eps where they are not both saturated; rerun "
                               "the attack with --eps auto")
    else:
        lead_text = lead(skip.label, verdicts, scope)
        what = (distance_what(setting[0], routing_grads(skip)) if setting else
                f"fixed-eps {_fixed_what(skip)} over the attacks every variant ran")
        verdict = f"{lead_text}. Evidence ({what}): " + " | ".join(clauses)
    health_checks = _health_checks(judged)
    for v in verdicts:
        if v.kind in ("confounded", "not-comparable"):
            log.warning("%s vs %s: %s", v.a, v.b, v.finding)

    curve_frames = [robustness_curve(d).assign(variant=label) for label, d in distances.items() if len(d)]
    curve_cols = ["variant", *DISTANCE_KEYS, "eps", "n", "robust_acc", "robust_acc_low", "robust_acc_high"]
    robustness = pd.concat(curve_frames, ignore_index=True)[curve_cols] if curve_frames else pd.DataFrame(
        columns=curve_cols)
    names = [labels[i] if labels else r.name for i, r in enumerate(runs)]
    return Comparison(runs=runs, variants=variants, common_attacks=common, table=table, differences=diff,
                      pairs=pairs, verdict=verdict, lead=lead_text, distance_pairs=distance_pairs,
                      curves=robustness, clean=_clean_accuracy(variants, setting[1] if setting else "fine"),
                      compute=_compute_points(variants, combined, distances, distance_pairs,
                                              pairs[0] if pairs else None),
                      transfer=transfer_matrix([r.records for r in runs]),
                      sanity={name: list(analyse(r).checks) for name, r in zip(names, runs)},
                      notes=notes, n_boot=n_boot, seed=seed, verdicts=verdicts, health=health_checks,
                      setting=setting, scope=scope)
