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
test samples only. :func:`robustness.analysis.seeds.compare_seeds` pools seed-replicated runs (hierarchical
bootstrap over seeds and samples, a seed-level sign-flip test). The reports only render the :class:`Comparison`
/ ``SeedComparison``.

This module is not re-exported by ``robustness.analysis``: it uses ``robustness.sanity``, which itself builds on
the analysis package.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from attacks.records import worst_case
from robustness.analysis.answer import short_answer
from robustness.analysis.distances import (DISTANCE_KEYS, DistanceComparison, compare_distances,
                                           minimal_distances, robustness_curve)
from robustness.analysis.metrics import compute_saved, is_gated
from robustness.analysis.selection import accuracy_rows, strongest_per_sample, whitebox
from robustness.analysis.stats import PAIR_KEYS, bootstrap_many, mcnemar_test, paired_difference, wilson_interval
from robustness.analysis.transfer import transfer_matrix
from robustness.analysis.verdict import (CHANCE_ALPHA, MAX_CLEAN_GAP, NEAR_CHANCE_FACTOR, Effect, Health,
                                         PairedTest, PairVerdict, chance_level_reasons, chance_p, health_reasons,
                                         join_reasons, judge, lead, paired_count_reason, seeds_scope)
from robustness.core.errors import DataError, RunDirError
from robustness.core.vocab import FORWARD_MODES, ROUTING_GRADIENTS, format_distance, format_eps
from robustness.data.base import DatasetInfo
from robustness.results import RunResults
from robustness.sanity import Check, run_checks

log = logging.getLogger(__name__)

#: Order of a run's variants: the skipping modes first, the no-skip view (``open``) last.
VARIANT_ORDER: list[str] = [m for m in FORWARD_MODES if m != "open"] + ["open"]
NORM_NAMES = {"linf": "L-inf", "l2": "L2"}
#: Name of the sanity check that reports each pair's training health on the comparison page.
HEALTH_CHECK = "training health"
#: Name of the check that reports whether each pair saw the same samples.
SAMPLES_CHECK = "same samples"


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

    @property
    def confounded(self) -> list[str]:
        """``a vs b: confounded by clean accuracy (...)`` for every pair the health guard refuses."""
        return [f"{v.a} vs {v.b}: {v.finding}" for v in self.verdicts if v.kind == "confounded"]

    @property
    def not_comparable(self) -> list[str]:
        """``a vs b: not comparable: ...`` for every pair with too few shared samples or different images/data."""
        return [f"{v.a} vs {v.b}: {v.finding}" for v in self.verdicts if v.kind == "not-comparable"]

    @property
    def comparable(self) -> bool:
        """No pair is confounded or not comparable (what ``dsn-robust compare --strict`` requires)."""
        return not (self.confounded or self.not_comparable)

    @property
    def answer(self) -> str:
        """The short answer (at most 200 characters, :mod:`robustness.analysis.answer`): what ``dsn-robust run``
        and ``compare`` print; ``verdict`` is the long form."""
        return short_answer(self.verdicts, self.verdict)


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


# ---------------------------------------------------------------------------------------------------------------
# The fixed-eps fallback: one eps, chosen where the pair differs most, tested honestly
# ---------------------------------------------------------------------------------------------------------------

def _fixed_eps_pair(a: Variant, b: Variant, ca: pd.DataFrame, cb: pd.DataFrame, n_boot: int,
                    seed: int) -> dict[str, Any] | None:
    """The fallback's pair: the worst-case rows (fine head, linf first) at finite eps > 0 where the two variants
    are not both saturated (both at 0%, or both at their clean accuracy: the attack fooled nothing), the eps with
    the largest absolute robust-accuracy difference. Its bootstrap interval re-selects the eps in every resample
    (on the samples every candidate eps shares); its exact McNemar test on the paired robust flags is
    Bonferroni-corrected for the number of candidate eps. None when every eps is saturated."""
    on = [*PAIR_KEYS, "sample"]
    cols = [*on, "robust", "clean_correct"]
    wa, wb = ca[ca["attack"] == "worst"], cb[cb["attack"] == "worst"]
    j = wa[cols].merge(wb[cols], on=on, suffixes=("_a", "_b"))
    eps = j["eps"].to_numpy(float)
    j = j[(eps > 0) & np.isfinite(eps)]
    if j.empty:
        return None
    if (j["target"] == "fine").any():
        j = j[j["target"] == "fine"]
    norm = "linf" if (j["norm"] == "linf").any() else str(j["norm"].iloc[0])
    j = j[j["norm"] == norm].astype({"robust_a": bool, "robust_b": bool, "clean_correct_a": bool,
                                    "clean_correct_b": bool})
    per = j.groupby(PAIR_KEYS, sort=True, observed=True).agg(
        acc_a=("robust_a", "mean"), acc_b=("robust_b", "mean"), clean_a=("clean_correct_a", "mean"),
        clean_b=("clean_correct_b", "mean"), n=("sample", "size")).reset_index()
    saturated = (((per["acc_a"] == 0) & (per["acc_b"] == 0))
                 | (np.isclose(per["acc_a"], per["clean_a"]) & np.isclose(per["acc_b"], per["clean_b"])))
    per = per[~saturated].reset_index(drop=True)
    if per.empty:
        return None
    diff = (per["acc_a"] - per["acc_b"]).to_numpy(float)
    k = int(np.argmax(np.abs(diff)))
    row = per.iloc[k]
    at = j[(j["attack"] == row["attack"]) & (j["eps"] == row["eps"]) & (j["target"] == row["target"])]
    ya, yb = at["robust_a"].to_numpy(bool), at["robust_b"].to_numpy(bool)
    # the interval: per resample of the shared samples, the difference at the eps where that resample differs most
    keyed = j.assign(d=j["robust_a"].astype(float) - j["robust_b"].astype(float))
    cand = per[PAIR_KEYS].merge(keyed, on=PAIR_KEYS)
    matrix = cand.pivot_table(index="sample", columns=PAIR_KEYS, values="d", aggfunc="first").dropna()
    if len(matrix):
        columns = [matrix[c].to_numpy(float) for c in matrix.columns]

        def picked(*rows: np.ndarray) -> np.ndarray:
            means = np.stack([r.mean(axis=1) for r in rows], axis=1)
            return means[np.arange(len(means)), np.argmax(np.abs(means), axis=1)][:, None]

        iv = bootstrap_many(picked, columns, n_boot, seed)[0]
        low, high = iv.low, iv.high
    else:
        low = high = float("nan")
    p, sign, b_only, c_only = mcnemar_test(ya, yb)
    return {"a": a.label, "b": b.label, "attack": row["attack"], "norm": row["norm"], "eps": float(row["eps"]),
            "target": row["target"], "n": int(row["n"]), "acc_a": float(row["acc_a"]), "acc_b": float(row["acc_b"]),
            "diff": float(diff[k]), "diff_low": float(low), "diff_high": float(high),
            "mcnemar_p": min(1.0, p * len(per)), "mcnemar_p_uncorrected": p, "candidates": int(len(per)),
            "sign": sign, "robust_only_a": b_only, "robust_only_b": c_only,
            "clean_a": float(row["clean_a"]), "clean_b": float(row["clean_b"]),
            "n_both_correct": int((at["clean_correct_a"].to_numpy(bool) & at["clean_correct_b"].to_numpy(bool)).sum())}


def _fixed_eps_effect(p: Mapping[str, Any], what: str) -> tuple[Effect, PairedTest]:
    effect = Effect(f"{what} robust accuracy difference at eps={format_eps(p['eps'], p['norm'])}", p["diff"],
                    p["diff_low"], p["diff_high"], "difference")
    corrected = f", Bonferroni over {p['candidates']} eps" if p["candidates"] > 1 else ""
    test = PairedTest("exact McNemar", p["mcnemar_p"], p["sign"], p["n"], "paired samples",
                      f"{p['robust_only_a']} vs {p['robust_only_b']} discordant{corrected}")
    return effect, test


# ---------------------------------------------------------------------------------------------------------------
# The guards' inputs: clean accuracy, chance, the attacked images, the data
# ---------------------------------------------------------------------------------------------------------------

def _fine_clean(v: Variant) -> tuple[float | None, int]:
    """The fine head's clean accuracy on the variant's white-box samples (None without fine-head rows) and how
    many samples it counts."""
    wb = whitebox(v.records)
    wb = wb[wb["target"] == "fine"].drop_duplicates("sample")
    return (float(wb["clean_correct"].astype(bool).mean()) if len(wb) else None), len(wb)


def _health(v: Variant, clean: float) -> Health:
    fine, n = _fine_clean(v)
    return Health(label=v.label, clean=float(clean), clean_fine=fine,
                  final_fine=v.run.final_test_accuracy.get("fine"),
                  chance=v.run.chance_accuracy if fine is not None else None, run=v.run.name,
                  n=n if fine is not None else None)


#: Keys of the attack manifests' ``data`` entry (where the attacked samples came from) that name the data itself
#: (not where it lies on disk or how it was handed over).
DATA_SOURCE_KEYS: tuple[str, ...] = ("dataset", "data_options", "shape", "sha256")


def _short(value: Any, limit: int = 60) -> str:
    """A value as a reason shows it, cut to ``limit`` characters."""
    text = str(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _info_differences(da: Any, db: Any) -> list[str]:
    """What differs between two manifests' ``dataset`` entries (:meth:`DatasetInfo.differences`: classes, label
    map, normalisation, image size, channels; the name is compared on its own), [] when either is not a complete
    dataset info."""
    try:
        ia, ib = DatasetInfo.from_dict(dict(da)), DatasetInfo.from_dict(dict(db))
    except (DataError, TypeError, ValueError):
        return []
    return [d for d in ia.differences(ib) if not d.startswith("dataset differs")]


def _differences(da: Any, db: Any, keys: Sequence[str] | None = None) -> list[tuple[str, Any, Any]]:
    """(key, a's value, b's value) for the keys both dicts give (``keys``: only those) whose values differ."""
    if not isinstance(da, Mapping) or not isinstance(db, Mapping):
        return []
    shared = [k for k in (keys if keys is not None else da) if k in da and k in db]
    return [(k, da[k], db[k]) for k in shared if da[k] is not None and db[k] is not None and da[k] != db[k]]


def _same_samples(a: Variant, b: Variant) -> list[str]:
    """Why ``a`` and ``b`` did not see the same samples: different attacked images (the subsets' sha256 when both
    runs recorded one, else their (dataset, seed, n); either way a different number of attacked samples ``n``)
    or different data (the runs' ``config.json`` dataset / data_options: trained on; the attack manifests'
    ``data`` entry (dataset, data_options) and ``dataset`` entry (classes, normalisation, image size):
    attacked on)."""
    if a.run is b.run:
        return []
    reasons = []
    na, nb = a.run.manifest.get("n"), b.run.manifest.get("n")
    counts = f"{na} vs {nb} attacked samples" if na is not None and nb is not None and na != nb else ""
    ha, hb = a.run.subset.get("sha256"), b.run.subset.get("sha256")
    if ha and hb:
        if ha != hb:
            reasons.append(f"{a.label} and {b.label} were attacked on different images ("
                           + (f"{counts}; " if counts else "") + f"subset sha256 {str(ha)[:12]} vs {str(hb)[:12]})")
        elif counts:
            reasons.append(f"{a.label} and {b.label} were attacked on different sample sets ({counts})")
    said: set[tuple[str, str]] = set()  # (a's value, b's value) pairs a reason already names
    if not (ha and hb):
        sa, sb = (a.run.dataset_name, a.run.seed, a.run.n), (b.run.dataset_name, b.run.seed, b.run.n)
        if sa != sb:
            reasons.append(f"{a.label} and {b.label} were attacked on different evaluation sets (dataset, seed, n "
                           f"{sa} vs {sb})")
            said.add((_short(sa[0]), _short(sb[0])))

    def clause(diffs: Sequence[tuple[str, Any, Any]]) -> str:
        fresh = []
        for k, va, vb in diffs:
            if (_short(va), _short(vb)) not in said:
                said.add((_short(va), _short(vb)))
                fresh.append(f"{k} {_short(va)} vs {_short(vb)}")
        return "; ".join(fresh)

    trained = clause(_differences(a.run.config, b.run.config, ("dataset", "data_options")))
    if trained:
        reasons.append(f"{a.label} and {b.label} were trained on different data ({trained})")
    names = ([("dataset", a.run.dataset_name, b.run.dataset_name)]
             if a.run.dataset_name and b.run.dataset_name and a.run.dataset_name != b.run.dataset_name else [])
    attacked = [x for x in (clause(names + _differences(a.run.manifest.get("data"), b.run.manifest.get("data"),
                                                          DATA_SOURCE_KEYS)),
                            *_info_differences(a.run.manifest.get("dataset"), b.run.manifest.get("dataset"))) if x]
    if attacked:
        reasons.append(f"{a.label} and {b.label} were attacked on different data ({'; '.join(attacked)})")
    return reasons


def _pct(x: float | None) -> str:
    return "unknown" if x is None or np.isnan(x) else f"{100 * x:.1f}%"


def _pg(p: float | None) -> str:
    return "unknown" if p is None else f"{p:.2g}"


def _health_checks(judged: Sequence[tuple[PairVerdict, tuple[Health, Health], int | None, Sequence[str]]]
                   ) -> list[Check]:
    """Per judged pair (verdict, health, samples correct on both, the :func:`_same_samples` reasons): ``training
    health`` (fail when confounded by clean accuracy or a side is at chance level) and ``same samples`` (fail when
    the pair has too few paired samples or saw different images or data), each with the numbers."""
    checks = []
    for v, (ha, hb), n, samples in judged:
        chance = ha.chance if ha.chance is not None else hb.chance
        finals = [f"{h.run} {_pct(h.final_fine)}" for h in (ha, hb) if h.final_fine is not None]
        known = [h for h in (ha, hb) if chance_p(h) is not None]
        numbers = (f"clean accuracy on the attacked samples {ha.label} {_pct(ha.clean)} vs {hb.label} "
                   f"{_pct(hb.clean)} (gap {100 * abs(ha.clean - hb.clean):.1f} points, at most "
                   f"{100 * MAX_CLEAN_GAP:g} allowed); chance {_pct(chance)}"
                   + (f" (near chance below {NEAR_CHANCE_FACTOR:g} x chance = {_pct(NEAR_CHANCE_FACTOR * chance)})"
                      if chance is not None else " (near-chance test skipped)")
                   + (f"; above chance by a one-sided binomial test (at chance unless p < {CHANCE_ALPHA:g}): "
                      + ", ".join(f"{h.label} p={_pg(chance_p(h))}" for h in known) if known else "")
                   + (f"; final training test accuracy {', '.join(dict.fromkeys(finals))}" if finals else ""))
        bad = health_reasons(ha, hb)
        at_chance = chance_level_reasons(ha, hb)
        said = (("not comparable: " + join_reasons(at_chance) + ". " if at_chance else "")
                + ("confounded: " + "; ".join(bad) + ". " if bad else ""))
        checks.append(Check(HEALTH_CHECK, "fail" if bad or at_chance else "pass",
                            f"{v.a} vs {v.b}: " + said + numbers[0].upper() + numbers[1:] + "."))
        size = f"{n} samples correct on both" if n is not None else "samples correct on both not counted"
        few = paired_count_reason(v.a, v.b, n)
        apart = [*samples, *([few] if few else [])]
        checks.append(Check(SAMPLES_CHECK, "fail" if apart else "pass",
                            f"{v.a} vs {v.b}: " + (f"not comparable: {join_reasons(apart)}." if apart
                                                   else f"the same attacked samples, {size}.")))
    return checks


# ---------------------------------------------------------------------------------------------------------------
# The verdict line
# ---------------------------------------------------------------------------------------------------------------

def _distance_clause(p: DistanceComparison, v: PairVerdict) -> str:
    fmt = lambda x: format_distance(x, p.norm)  # noqa: E731
    ratio = (f"{v.evidence}; medians {fmt(p.median_a.estimate)} vs {fmt(p.median_b.estimate)}"
             if p.n_both_correct else "no distance ratio (no sample is classified correctly by both)")
    return (f"{p.a} vs {p.b}: {ratio}; curves differ most at eps={fmt(p.eps_at)}: "
            f"{100 * p.acc_a_at:.1f}% vs {100 * p.acc_b_at:.1f}% ({100 * p.diff_at.estimate:+.1f} points "
            f"[{100 * p.diff_at.low:+.1f}, {100 * p.diff_at.high:+.1f}]), mean gap over eps <= {fmt(p.cap)} "
            f"{100 * p.gap.estimate:+.1f} points [{100 * p.gap.low:+.1f}, {100 * p.gap.high:+.1f}]; "
            f"clean {100 * p.clean_a.estimate:.1f}% vs {100 * p.clean_b.estimate:.1f}%")


def _fixed_clause(p: Mapping[str, Any], v: PairVerdict) -> str:
    return (f"{p['a']} vs {p['b']}: {v.evidence}; robust acc {100 * p['acc_a']:.1f}% vs {100 * p['acc_b']:.1f}% "
            f"at eps={format_eps(p['eps'], p['norm'])} (where they differ most, of {p['candidates']} unsaturated eps); "
            f"clean {100 * p['clean_a']:.1f}% vs {100 * p['clean_b']:.1f}%")


def routing_grads(skip: Variant) -> list[str]:
    return sorted(set(whitebox(skip.records)["gate_grad"].astype(str)) & set(ROUTING_GRADIENTS))


def distance_what(norm: str, grads: Sequence[str]) -> str:
    return (f"minimal {NORM_NAMES.get(norm, norm)} distance per sample, minimum over attacks and routing "
            f"gradients (none{'/' + '/'.join(grads) if grads else ''})")


def _cannot_tell(skip: Variant | None, statics: Sequence[Variant]) -> str | None:
    if skip is None:
        return "Cannot tell: no variant skips layers (a gated model in a mode other than open)."
    if not statics:
        return f"Cannot tell: no static (non-skipping) variant to compare {skip.label} against."
    return None


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
                      sanity={name: run_sanity(r) for name, r in zip(names, runs)},
                      notes=notes, n_boot=n_boot, seed=seed, verdicts=verdicts, health=health_checks,
                      setting=setting, scope=scope)


def _fixed_what(skip: Variant) -> str:
    grads = routing_grads(skip)
    return f"worst-case (incl. {'/'.join(grads)})" if grads else "worst-case"
