"""The one rule that turns a paired comparison into a verdict, and the guards that refuse to give one.

Every skip-vs-no-skip finding of the suite goes through :func:`judge`: the distance verdict (median per-sample
distance ratio + Wilcoxon signed-rank test), the fixed-eps fallback (robust-accuracy difference + exact McNemar
test) and the seed-pooled verdict (hierarchical-bootstrap ratio + seed-level sign-flip test).

The rule (:func:`classify`), for an effect with a 95% interval and a two-sided paired test at :data:`ALPHA`:

- ``more`` / ``less`` robust: the test is significant, points the same way, and the interval lies entirely
  outside the negligible band (:data:`RATIO_BAND` for distance ratios, :data:`ACCURACY_BAND` for accuracy
  differences);
- ``equivalent`` ("no practical difference"): the interval lies entirely inside the band;
- ``none`` ("no evidence of a difference"): the interval contains no difference and the test is not significant;
- ``inconclusive``: anything else (a significant test whose interval reaches into the band or contains no
  difference, an interval that excludes no difference without a significant test, a test and an interval that
  point opposite ways), always with the reason.

Before the rule, the guards (:func:`comparability_reasons`, :func:`health_reasons`): a pair is ``not-comparable``
("not comparable: <reason>", never a direction) when

- fewer than :data:`MIN_BOTH_CORRECT` samples are classified correctly by both sides (the paired samples the
  distance ratio and its test live on; below 6 an exact two-sided signed-rank or sign test cannot reach p < 0.05
  at all, and 10 leaves a margin for ties and the bootstrap interval of a median);
- either side is at chance level on clean data (:func:`chance_level_reasons`): its fine head's clean accuracy on
  the attacked samples is not significantly above chance (1 / fine classes) by a one-sided exact binomial test at
  :data:`CHANCE_ALPHA`, i.e. its correct answers are no evidence that it learned anything, so its "robustness" is
  that of a guesser;
- or the sides were attacked on different images (different subset hashes or sample counts) or trained /
  attacked on different data (the caller's ``samples`` reasons,
  :func:`robustness.findings.comparability._same_samples`).

It is ``confounded`` (by clean accuracy) when either side is near chance (clean accuracy below
:data:`NEAR_CHANCE_FACTOR` x chance, on the attacked samples or at the end of training) or the two clean
accuracies on the attacked samples differ by more than :data:`MAX_CLEAN_GAP`. "At chance" is the stricter of the
two chance rules: a side with at least :data:`MIN_BOTH_CORRECT` correct answers at or above
:data:`NEAR_CHANCE_FACTOR` x chance always passes the binomial test (its worst case, 10 correct answers where 5
are expected by chance, has p < 0.032), so no pair the other guards let through is made not comparable
by it.

What an interval covers is part of every verdict (:func:`seeds_scope`): runs of one training seed each give
intervals over test samples only (:data:`ONE_SEED`). Pooled over seeds, the test is a sign-flip test over the
per-seed effects, because a training seed is the unit of replication for "does this recipe make networks more
robust"; exact with k seeds, its smallest two-sided p is 2 / 2^k, so fewer than :data:`MIN_SEEDS_FOR_TEST` seeds
can never give "more / less robust" (the rule then says inconclusive and why, or equivalence / no evidence).

Pure: numbers and labels in, a :class:`PairVerdict` out; no records, no runs (``compare`` gathers those).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: Two-sided significance level of every paired test behind a verdict.
ALPHA: float = 0.05
#: Median distance ratios inside this band are "no practical difference" (a 5% change of the per-sample minimal
#: perturbation is well inside what a rerun of the attack or a second training seed moves).
RATIO_BAND: tuple[float, float] = (0.95, 1.05)
#: Robust-accuracy differences (fractions) inside this band are "no practical difference" (+-2 points).
ACCURACY_BAND: tuple[float, float] = (-0.02, 0.02)
#: A pair needs at least this many samples that both sides classify correctly (the distance ratio lives on them).
MIN_BOTH_CORRECT: int = 10
#: Clean accuracy below this multiple of chance (1 / fine classes) is "near chance".
NEAR_CHANCE_FACTOR: float = 2.0
#: One-sided level of the exact binomial test "clean accuracy above chance" on the attacked samples: a side whose
#: test is not significant at this level is "at chance level" and its pair not comparable.
CHANCE_ALPHA: float = ALPHA
#: Clean accuracies (fractions, on the attacked samples) further apart than this confound a comparison.
MAX_CLEAN_GAP: float = 0.10

#: Verdict kinds, in the order a lead lists them.
KINDS: tuple[str, ...] = ("more", "less", "equivalent", "none", "inconclusive", "confounded", "not-comparable")
#: Kinds that are no answer to "is skipping more robust?" (``dsn-robust compare --strict`` exits 2 on them).
NOT_AN_ANSWER: tuple[str, ...] = ("confounded", "not-comparable")

ONE_SEED = "one training seed: the interval covers test samples only"


def seeds_scope(n_seeds: int) -> str:
    """What an interval covers, said in every verdict: test samples only (one seed), or seeds and samples."""
    if n_seeds <= 1:
        return ONE_SEED
    return f"{n_seeds} training seeds: the interval covers training seeds and test samples"


def smallest_sign_flip_p(n_seeds: int) -> float:
    """The smallest two-sided p an exact sign-flip test over ``n_seeds`` values can give (2 / 2^n)."""
    return min(1.0, 2.0 / 2 ** n_seeds) if n_seeds > 0 else 1.0


#: The fewest seeds with which the seed-level sign-flip test can reach p < ALPHA (6: 2/64 = 0.031).
MIN_SEEDS_FOR_TEST: int = next(k for k in range(1, 64) if smallest_sign_flip_p(k) < ALPHA)


def _pct(x: float | None) -> str:
    return "?" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _p(p: float) -> str:
    return "undefined" if p is None or math.isnan(p) else f"{p:.2g}"


# ---------------------------------------------------------------------------------------------------------------
# What a verdict is made of
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Effect:
    """An effect size with its interval: a ``ratio`` (no difference = 1) or a ``difference`` of fractions
    (no difference = 0, shown in points)."""

    name: str          # e.g. "median distance ratio", "worst-case robust accuracy difference at eps=8/255"
    estimate: float
    low: float
    high: float
    scale: str = "ratio"

    @property
    def null(self) -> float:
        return 1.0 if self.scale == "ratio" else 0.0

    @property
    def band(self) -> tuple[float, float]:
        return RATIO_BAND if self.scale == "ratio" else ACCURACY_BAND

    def interval_text(self) -> str:
        """``0.48 [0.35, 0.68]`` (ratio) or ``+12.0 points [+5.0, +19.0]`` (difference)."""
        if self.scale == "ratio":
            return f"{self.estimate:.2f} {self.bounds_text()}"
        return f"{100 * self.estimate:+.1f} points {self.bounds_text()}"

    def bounds_text(self) -> str:
        """The interval alone: ``[0.35, 0.68]`` or ``[+5.0, +19.0]`` (points)."""
        if self.scale == "ratio":
            return f"[{self.low:.2f}, {self.high:.2f}]"
        return f"[{100 * self.low:+.1f}, {100 * self.high:+.1f}]"

    def band_text(self) -> str:
        lo, hi = self.band
        return f"negligible band [{lo:.2f}, {hi:.2f}]" if self.scale == "ratio" else \
            f"negligible band ±{100 * hi:g} points"

    def text(self) -> str:
        return f"{self.name} {self.interval_text()}"


@dataclass(frozen=True)
class PairedTest:
    """A two-sided paired test: its name, p-value, the direction its statistic points (+1: the first side more
    robust, -1: less, 0: none / unknown), the sample size it saw and an optional note (e.g. discordant counts)."""

    name: str          # "Wilcoxon", "exact McNemar", "seed-level sign-flip"
    p: float
    sign: int = 0
    n: int = 0
    unit: str = "correct on both"
    note: str = ""

    @property
    def significant(self) -> bool:
        return bool(self.p < ALPHA)

    def text(self) -> str:
        note = f" ({self.note})" if self.note else ""
        return f"{self.name} p={_p(self.p)}{note}, n={self.n} {self.unit}"


@dataclass(frozen=True)
class Health:
    """One side of a pair as the health guard reads it: clean accuracy on the pair's attacked samples (the
    verdict's head), the fine head's clean accuracy on the attacked samples and at the end of training, chance,
    and ``n``: how many attacked samples ``clean_fine`` (else ``clean``) counts (None: the chance-level test is
    skipped)."""

    label: str
    clean: float
    clean_fine: float | None = None
    final_fine: float | None = None
    chance: float | None = None
    run: str = ""
    n: int | None = None


@dataclass(frozen=True)
class PairVerdict:
    """The verdict on one (skipping, static) pair: ``kind`` (one of :data:`KINDS`), the reason when it is
    inconclusive, confounded or not comparable, and the effect and test it rests on."""

    a: str
    b: str
    kind: str
    reason: str = ""
    effect: Effect | None = None
    test: PairedTest | None = None
    scope: str = ONE_SEED
    confounders: tuple[str, ...] = field(default_factory=tuple)

    @property
    def answer(self) -> bool:
        """False when the pair is confounded or not comparable: then it is no answer either way."""
        return self.kind not in NOT_AN_ANSWER

    @property
    def finding(self) -> str:
        """What the pair shows, said of ``a`` against ``b`` (see :func:`finding_text`)."""
        return finding_text(self.kind, self.b, self.reason, self.confounders)

    @property
    def evidence(self) -> str:
        """``median distance ratio 0.48 [0.35, 0.68], Wilcoxon p=0.002, n=71 correct on both; negligible band
        [0.95, 1.05]``; '' when there is no effect."""
        if self.effect is None:
            return ""
        test = f", {self.test.text()}" if self.test is not None else ""
        return f"{self.effect.text()}{test}; {self.effect.band_text()}"

    def as_dict(self) -> dict[str, Any]:
        e, t = self.effect, self.test
        return {"a": self.a, "b": self.b, "kind": self.kind, "finding": self.finding, "reason": self.reason,
                "evidence": self.evidence, "scope": self.scope, "confounders": list(self.confounders),
                "effect": None if e is None else {"name": e.name, "estimate": e.estimate, "low": e.low,
                                                  "high": e.high, "scale": e.scale, "band": list(e.band)},
                "test": None if t is None else {"name": t.name, "p": t.p, "sign": t.sign, "n": t.n,
                                                "note": t.note, "alpha": ALPHA}}


def finding_text(kind: str, b: str, reason: str = "", confounders: Sequence[str] = ()) -> str:
    """The wording of each kind, said of the skipping side against ``b`` (for ``confounded``, ``reason`` holds the
    clean accuracies and ``confounders`` what is wrong with them)."""
    if kind == "more":
        return f"more robust than {b}"
    if kind == "less":
        return f"less robust than {b}"
    if kind == "equivalent":
        return f"no practical difference from {b}"
    if kind == "none":
        return f"no evidence of a difference from {b}"
    if kind == "inconclusive":
        return f"inconclusive against {b} ({reason})"
    if kind == "confounded":
        return f"confounded by clean accuracy ({reason})" + (f": {'; '.join(confounders)}" if confounders else "")
    if kind == "not-comparable":
        return f"not comparable: {reason}"
    raise ValueError(f"unknown verdict kind {kind!r}; expected one of {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------------------------

def classify(effect: Effect, test: PairedTest) -> tuple[str, str]:
    """(kind, reason) of an effect and its paired test by the rule of this module (see the module docstring)."""
    lo_band, hi_band = effect.band
    low, high, null = effect.low, effect.high, effect.null
    iv = f"the interval {effect.bounds_text()}"
    if any(math.isnan(v) for v in (effect.estimate, low, high)) or math.isnan(test.p):
        return "inconclusive", "the interval or the test is undefined"
    if lo_band <= low and high <= hi_band:
        return "equivalent", ""
    side = "more" if low > hi_band else "less" if high < lo_band else ""
    contains_null = low <= null <= high
    sig = test.significant
    extra = f"; {test.note}" if test.note and not sig else ""
    if sig and side:
        if test.sign and (test.sign > 0) != (side == "more"):
            return "inconclusive", (f"the {test.name} test (p={_p(test.p)}) and {iv} point in opposite "
                                    "directions")
        return side, ""
    if not sig and contains_null:
        return "none", ""
    if sig and contains_null:
        return "inconclusive", (f"the {test.name} test is significant (p={_p(test.p)}) but {iv} contains no "
                                f"difference ({null:g})")
    if sig:
        return "inconclusive", (f"the {test.name} test is significant (p={_p(test.p)}) but {iv} reaches into "
                                f"the {effect.band_text()}")
    return "inconclusive", (f"{iv} excludes no difference ({null:g}) but the {test.name} test is not "
                            f"significant (p={_p(test.p)}){extra}")


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact (summed in log space, so large n do not overflow)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    lp, lq, ln = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    logs = [ln - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * math.fsum(math.exp(v - top) for v in logs))


def chance_p(side: Health) -> float | None:
    """One-sided exact binomial p of "``side``'s clean accuracy on the attacked samples is above chance" (the fine
    head's when known); None when chance or the sample count is unknown."""
    if side.chance is None or not 0 < side.chance < 1 or not side.n:
        return None
    acc = side.clean_fine if side.clean_fine is not None else side.clean
    if acc is None or math.isnan(acc):
        return None
    return binomial_sf(int(round(acc * side.n)), int(side.n), side.chance)


def chance_level_reasons(a: Health, b: Health) -> list[str]:
    """Which side is at chance level on clean data: its clean accuracy on the attacked samples not significantly
    above chance (one-sided exact binomial test, :data:`CHANCE_ALPHA`); skipped where chance or n is unknown."""
    reasons = []
    for side in (a, b):
        p = chance_p(side)
        if p is None or p < CHANCE_ALPHA:
            continue
        acc = side.clean_fine if side.clean_fine is not None else side.clean
        k = int(round(acc * side.n))
        reasons.append(f"{side.label} is at chance level on clean data ({k} of {side.n} attacked samples "
                       f"correct = {_pct(acc)}, not significantly above chance {_pct(side.chance)}: one-sided "
                       f"binomial p={_p(p)} ≥ {CHANCE_ALPHA:g})")
    return reasons


def paired_count_reason(a: str, b: str, n_both_correct: int | None) -> str | None:
    """Why the pair has too few paired samples (correct on both), None when it has :data:`MIN_BOTH_CORRECT`."""
    if n_both_correct is None or n_both_correct >= MIN_BOTH_CORRECT:
        return None
    if n_both_correct == 1:
        return (f"only 1 sample is classified correctly by both {a} and {b} (at least {MIN_BOTH_CORRECT} "
                "needed)")
    return (f"only {n_both_correct} samples are classified correctly by both {a} and {b} (at least "
            f"{MIN_BOTH_CORRECT} needed)")


def comparability_reasons(a: str, b: str, *, n_both_correct: int | None = None, samples: Sequence[str] = (),
                          health: tuple[Health, Health] | None = None) -> list[str]:
    """Why ``a`` and ``b`` cannot be compared at all: the caller's ``samples`` reasons (different images or
    data), too few samples correct on both (the minimum is :data:`MIN_BOTH_CORRECT`), a side at chance level on
    clean data (:func:`chance_level_reasons`, with ``health``)."""
    reasons = list(samples)
    few = paired_count_reason(a, b, n_both_correct)
    if few:
        reasons.append(few)
    if health is not None:
        reasons += chance_level_reasons(*health)
    return list(dict.fromkeys(reasons))


def join_reasons(reasons: Sequence[str]) -> str:
    """Reasons as one clause: ``x``, ``x and y``, ``x, y and z`` (the lead separates pairs with '; ')."""
    reasons = list(reasons)
    if len(reasons) <= 1:
        return "".join(reasons)
    return ", ".join(reasons[:-1]) + " and " + reasons[-1]


def health_reasons(a: Health, b: Health) -> list[str]:
    """Why the pair's clean accuracies confound it: either side near chance (below :data:`NEAR_CHANCE_FACTOR` x
    chance, on the attacked samples or at the end of training; skipped when chance is unknown) or the two clean
    accuracies on the attacked samples more than :data:`MAX_CLEAN_GAP` apart."""
    reasons = []
    gap = abs(a.clean - b.clean)
    if gap > MAX_CLEAN_GAP + 1e-12:
        reasons.append(f"their clean accuracies differ by {100 * gap:.1f} points (more than "
                       f"{100 * MAX_CLEAN_GAP:g})")
    for side in (a, b):
        if side.chance is None or not side.chance > 0:
            continue
        floor = NEAR_CHANCE_FACTOR * side.chance
        clean = side.clean_fine if side.clean_fine is not None else side.clean
        if clean < floor:
            reasons.append(f"{side.label} is near chance on the attacked samples ({_pct(clean)}, below "
                           f"{NEAR_CHANCE_FACTOR:g} x chance = {_pct(floor)})")
        if side.final_fine is not None and side.final_fine < floor:
            reasons.append(f"{side.run or side.label} ended training near chance (test accuracy "
                           f"{_pct(side.final_fine)}, below {_pct(floor)})")
    return list(dict.fromkeys(reasons))


def health_summary(a: Health, b: Health) -> str:
    """``dsn(hard) 54.0% vs dual 68.0%, chance 6.2%``: the numbers a confounded verdict names."""
    chance = a.chance if a.chance is not None else b.chance
    return f"{a.label} {_pct(a.clean)} vs {b.label} {_pct(b.clean)}" + (
        f", chance {_pct(chance)}" if chance is not None else "")


def judge(a: str, b: str, effect: Effect | None, test: PairedTest | None, *,
          health: tuple[Health, Health] | None = None, n_both_correct: int | None = None,
          samples: Sequence[str] = (), scope: str = ONE_SEED) -> PairVerdict:
    """The verdict on ``a`` against ``b``: not comparable, else confounded, else :func:`classify`."""
    reasons = comparability_reasons(a, b, n_both_correct=n_both_correct, samples=samples, health=health)
    if reasons:
        return PairVerdict(a, b, "not-comparable", join_reasons(reasons), effect, test, scope)
    if health is not None:
        confounders = health_reasons(*health)
        if confounders:
            return PairVerdict(a, b, "confounded", health_summary(*health), effect, test, scope,
                               tuple(confounders))
    if effect is None or test is None:
        return PairVerdict(a, b, "inconclusive", "no effect size or test to judge", effect, test, scope)
    kind, reason = classify(effect, test)
    return PairVerdict(a, b, kind, reason, effect, test, scope)


def lead(skip: str, verdicts: Sequence[PairVerdict], scope: str) -> str:
    """The verdict's first sentence: per kind the static variants it holds for (inconclusive, confounded and not
    comparable pairs each with their reason), then what the intervals cover."""
    grouped: dict[str, list[str]] = {}
    single: list[tuple[str, str]] = []
    for v in verdicts:
        if v.kind in ("more", "less", "equivalent", "none"):
            grouped.setdefault(v.kind, []).append(v.b)
        else:
            single.append((v.kind, v.finding))
    parts = [finding_text(k, ", ".join(grouped[k])) for k in KINDS if k in grouped]
    parts += [text for k in KINDS for kind, text in single if kind == k]
    return f"Skipping ({skip}): " + "; ".join(parts) + f" — {scope}"
