"""Seed-replicated runs pooled: :func:`compare_seeds`.

Whether skipping makes a network more robust is a claim about a training procedure, so the pipeline can train and
attack every model once per training seed (``[run] seeds``), all on the same attacked images. Each seed is compared
on its own (:func:`robustness.findings.compare.compare_runs`); the pooled effect is the median per-sample log
distance ratio over every seed's paired samples, with an interval from a hierarchical bootstrap (resample the seeds,
then one shared resample of the attacked images: the same images in every seed must not count as independent), and
the pooled test is an exact sign-flip test over the per-seed median log ratios, because the training seed is what
is replicated. Every pair then goes through the one rule and its guards (:mod:`robustness.analysis.verdict`).

Not re-exported by ``robustness.analysis`` (it builds on ``compare``, which uses ``robustness.sanity``).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from robustness.findings.compare import Comparison, Findings, Variant, compare_runs
from robustness.findings.compare_text import distance_what, routing_grads
from robustness.analysis.distances import paired_log_ratios
from robustness.analysis.stats import Interval, hierarchical_bootstrap, sign_flip_test
from robustness.analysis.verdict import (ALPHA, MIN_SEEDS_FOR_TEST, Effect, PairedTest, PairVerdict, judge,
                                         lead, seeds_scope, smallest_sign_flip_p)
from robustness.core.errors import RunDirError
from robustness.results import RunResults

log = logging.getLogger(__name__)

@dataclass
class PooledPair:
    """A (skipping, static) pair pooled over training seeds, from minimal distances in one norm and head.

    ``ratio``: the median over every seed's samples correct on both of ``d_A / d_B``, with a hierarchical
    bootstrap interval (seeds, then the shared test images: :func:`robustness.analysis.stats.
    hierarchical_bootstrap`). ``test``: the seed-level sign-flip test over the per-seed median log ratios (one
    seed: that seed's own Wilcoxon test). ``seed_ratios`` / ``seed_intervals``: each seed's own median ratio and
    its (samples-only) interval, ``seed_p`` its Wilcoxon p and ``seed_findings`` its own verdict; ``clean_a`` /
    ``clean_b``: each seed's clean accuracy on the shared samples. ``samples_only``: the same pooled median with an
    interval that resamples the pooled samples alone, as if every seed's samples were fresh images of one model
    (shown beside ``ratio``: how much the training seeds widen it; None with one seed).
    """

    a: str
    b: str
    norm: str
    head: str
    seeds: list[int]
    n: int
    n_by_seed: dict[int, int]
    ratio: Interval
    seed_ratios: dict[int, float]
    seed_intervals: dict[int, Interval]
    seed_p: dict[int, float]
    seed_findings: dict[int, str]
    test: PairedTest
    clean_a: dict[int, float]
    clean_b: dict[int, float]
    verdict: PairVerdict
    samples_only: Interval | None = None

    def finding(self) -> str:
        """The pooled verdict's kind (:data:`robustness.analysis.verdict.KINDS`)."""
        return self.verdict.kind


@dataclass
class SeedComparison(Findings):
    """Seed-replicated comparison (see :func:`compare_seeds`): the pooled verdict per pair, then every seed's own
    :class:`Comparison`."""

    seeds: list[int]
    per_seed: dict[int, Comparison]
    pooled: list[PooledPair]
    verdict: str
    lead: str
    scope: str
    labels: list[str]
    notes: list[str] = field(default_factory=list)
    n_boot: int = 1000
    seed: int = 0

    @property
    def first(self) -> Comparison:
        """The first seed's comparison (whose detail sections the page shows)."""
        return self.per_seed[self.seeds[0]]

    @property
    def verdicts(self) -> list[PairVerdict]:
        """The pooled verdict of each pair."""
        return [p.verdict for p in self.pooled]

    @property
    def confounded(self) -> list[str]:
        """The pooled pairs refused by the health guard, else each seed's (``seed s: ...``)."""
        return self._refused("confounded") or [f"seed {s}: {r}" for s, c in self.per_seed.items()
                                                for r in c.confounded]

    @property
    def not_comparable(self) -> list[str]:
        """The pooled pairs that are not comparable, else each seed's (``seed s: ...``)."""
        return self._refused("not-comparable") or [f"seed {s}: {r}" for s, c in self.per_seed.items()
                                                    for r in c.not_comparable]

    @property
    def clean(self) -> pd.DataFrame:
        """seed, variant, n, clean_acc (+_low/_high): every seed's clean accuracy table."""
        return pd.concat([c.clean.assign(seed=s) for s, c in self.per_seed.items()], ignore_index=True)[
            ["seed", "variant", "n", "clean_acc", "clean_acc_low", "clean_acc_high"]]


def _variant(cmp: Comparison, label: str) -> Variant | None:
    return next((v for v in cmp.variants if v.label == label), None)


def _seed_test(medians: Sequence[float], n: int) -> PairedTest:
    """The pooled test: the exact sign-flip test over the per-seed median log ratios. Training seeds are the unit
    of replication, so a per-sample test over all seeds' samples (which treats the seeds' shared images as
    independent and ignores seed-to-seed variation) would be too sure; with k seeds its smallest p is 2 / 2^k."""
    p, sign = sign_flip_test(medians)
    k = len(medians)
    note = f"exact, over {k} per-seed median log ratios"
    if smallest_sign_flip_p(k) >= ALPHA:
        note += (f"; {k} seeds cannot reach p < {ALPHA:g} by this test (smallest possible p "
                 f"{smallest_sign_flip_p(k):.2g}), at least {MIN_SEEDS_FOR_TEST} are needed")
    return PairedTest("seed-level sign-flip", p, sign, n, f"correct on both over {k} seeds", note)


def _pool_pair(a: str, b: str, seeds: Sequence[int], per_seed: Mapping[int, Comparison],
               setting: tuple[str, str], scope: str, n_boot: int, seed: int) -> PooledPair:
    groups, ids, medians = [], [], []
    info: dict[str, dict[int, Any]] = {k: {} for k in ("n", "ratio", "iv", "p", "finding", "clean_a", "clean_b")}
    not_comparable, confounded, confounders = [], [], []
    for s in seeds:
        cmp = per_seed[s]
        v = next((x for x in cmp.verdicts if (x.a, x.b) == (a, b)), None)
        p = next((x for x in cmp.distance_pairs if (x.a, x.b) == (a, b)), None)
        va, vb = _variant(cmp, a), _variant(cmp, b)
        if v is None or p is None or va is None or vb is None or cmp.setting != setting:
            not_comparable.append(f"seed {s} has no minimal-distance comparison of {a} and {b} in "
                                  f"{setting[0]}/{setting[1]}")
            continue
        if v.kind == "not-comparable":
            not_comparable.append(f"seed {s}: {v.reason}")
        elif v.kind == "confounded":
            confounded.append(f"seed {s}: {v.reason}")
            confounders.extend(f"in seed {s}, {c}" for c in v.confounders)
        lr = paired_log_ratios(va.distances(*setting), vb.distances(*setting))
        x = lr["log_ratio"].to_numpy(float)
        info["n"][s], info["iv"][s], info["p"][s], info["finding"][s] = len(x), p.ratio, p.wilcoxon_p, v.finding
        info["ratio"][s], info["clean_a"][s], info["clean_b"][s] = p.ratio.estimate, p.clean_a.estimate, \
            p.clean_b.estimate
        if len(x):
            groups.append(x)
            ids.append(lr["sample"].to_numpy(np.int64))
            medians.append(float(np.median(x)))
    ratio = _exp(hierarchical_bootstrap(groups, ids, n_boot=n_boot, seed=seed))
    flat = [np.concatenate(groups)] if groups else []
    samples_only = _exp(hierarchical_bootstrap(flat, None, n_boot=n_boot, seed=seed))
    n = int(sum(info["n"].values()))
    test = _seed_test(medians, n)
    effect = Effect("pooled median distance ratio", ratio.estimate, ratio.low, ratio.high, "ratio")
    if not_comparable:
        verdict = PairVerdict(a, b, "not-comparable", "; ".join(not_comparable), effect, test, scope)
    elif confounded:
        verdict = PairVerdict(a, b, "confounded", "; ".join(confounded), effect, test, scope, tuple(confounders))
    else:
        verdict = judge(a, b, effect, test, n_both_correct=n, scope=scope)
    return PooledPair(a=a, b=b, norm=setting[0], head=setting[1], seeds=list(seeds), n=n, n_by_seed=info["n"],
                      ratio=ratio, seed_ratios=info["ratio"], seed_intervals=info["iv"], seed_p=info["p"],
                      seed_findings=info["finding"], test=test, clean_a=info["clean_a"], clean_b=info["clean_b"],
                      verdict=verdict, samples_only=samples_only)


def _exp(log_iv: Interval) -> Interval:
    """An interval of log ratios as one of ratios."""
    return Interval(*(float(np.exp(t)) for t in (log_iv.estimate, log_iv.low, log_iv.high)), log_iv.n)


def compare_seeds(runs_by_seed: Mapping[int, Sequence[RunResults]], labels: Sequence[str] | None = None, *,
                  n_boot: int = 1000, seed: int = 0) -> SeedComparison:
    """Compare seed-replicated runs: each seed's list holds the same models in the same order (e.g. [dsn, dual]),
    trained with that seed and attacked on the same images.

    Every seed gets its own :func:`compare_runs` (labels: ``labels``, else the first seed's run names, so that the
    variants line up across seeds). Each (skipping, static) pair is pooled (:class:`PooledPair`): the median
    per-sample log distance ratio over all seeds' samples correct on both, its hierarchical-bootstrap interval
    (seeds, then the shared test images), and the seed-level sign-flip test, judged by the one rule of
    :mod:`robustness.analysis.verdict`; a pair not comparable or confounded in any seed is so pooled, naming the
    seed. One seed: the pooled pair is that seed's own (Wilcoxon) verdict, and says its interval covers test
    samples only. Raises ``RunDirError`` when no seed is given or the seeds hold different numbers of runs.
    """
    seeds = sorted(int(s) for s in runs_by_seed)
    if not seeds:
        raise RunDirError("a seed comparison needs at least one seed's runs")
    lists = {s: list(runs_by_seed[s]) for s in seeds}
    sizes = {s: len(r) for s, r in lists.items()}
    if len(set(sizes.values())) > 1 or not sizes[seeds[0]]:
        raise RunDirError("every seed must hold the same models in the same order; got "
                          + ", ".join(f"seed {s}: {k} runs" for s, k in sizes.items()))
    labels = list(labels) if labels is not None else [r.name for r in lists[seeds[0]]]
    per_seed = {s: compare_runs(lists[s], labels, n_boot=n_boot, seed=seed) for s in seeds}
    first = per_seed[seeds[0]]
    scope = seeds_scope(len(seeds))
    notes: list[str] = []
    hashes = {s: tuple(str(r.subset.get("sha256", "")) for r in lists[s]) for s in seeds}
    if len(set(hashes.values())) > 1 and all(all(h) for h in hashes.values()):
        notes.append("The seeds were attacked on different images (subset sha256 differ between seeds): the pooled "
                     "interval then also covers the choice of images.")
    skip = first.skipping
    pooled: list[PooledPair] = []
    if skip is not None and first.setting is not None:
        for v in first.verdicts:
            if len(seeds) == 1:
                p = next((x for x in first.distance_pairs if (x.a, x.b) == (v.a, v.b)), None)
                if p is None:
                    continue
                s = seeds[0]
                pooled.append(PooledPair(a=v.a, b=v.b, norm=p.norm, head=first.setting[1], seeds=[s],
                                         n=p.n_both_correct, n_by_seed={s: p.n_both_correct}, ratio=p.ratio,
                                         seed_ratios={s: p.ratio.estimate}, seed_intervals={s: p.ratio},
                                         seed_p={s: p.wilcoxon_p}, seed_findings={s: v.finding}, test=p.test(),
                                         clean_a={s: p.clean_a.estimate}, clean_b={s: p.clean_b.estimate},
                                         verdict=v))
            else:
                pooled.append(_pool_pair(v.a, v.b, seeds, per_seed, first.setting, scope, n_boot, seed))
    per_seed_text = "; ".join(f"seed {s}: " + (", ".join(v.finding for v in c.verdicts) or c.lead)
                              for s, c in per_seed.items())
    if len(seeds) == 1:
        lead_text, verdict = first.lead, first.verdict
    elif pooled:
        lead_text = lead(skip.label, [p.verdict for p in pooled], scope)
        what = distance_what(first.setting[0], routing_grads(skip))
        clauses = [f"{p.a} vs {p.b}: {p.verdict.evidence}; resampling the samples alone (seeds ignored) would give "
                   f"[{p.samples_only.low:.2f}, {p.samples_only.high:.2f}]; per-seed ratios "
                   + ", ".join(f"seed {s} {r:.2f}" for s, r in p.seed_ratios.items()) + "; clean "
                   + ", ".join(f"seed {s} {100 * p.clean_a[s]:.1f}% vs {100 * p.clean_b[s]:.1f}%"
                               for s in p.clean_a) for p in pooled]
        verdict = f"{lead_text}. Pooled evidence ({what}): " + " | ".join(clauses) + f". Per seed: {per_seed_text}"
    else:
        lead_text = (f"Cannot pool the {len(seeds)} seeds: " + (
            first.lead if skip is None or not first.verdicts else
            "no minimal-distance records (the pooled verdict needs a minimal attack, e.g. --eps auto)"))
        verdict = f"{lead_text}. Per seed: {per_seed_text}"
    for p in pooled:
        if p.verdict.kind in ("confounded", "not-comparable"):
            log.warning("pooled %s vs %s: %s", p.a, p.b, p.verdict.finding)
    return SeedComparison(seeds=seeds, per_seed=per_seed, pooled=pooled, verdict=verdict, lead=lead_text,
                          scope=scope, labels=labels, notes=notes, n_boot=n_boot, seed=seed)
