"""Eps-free robustness: each sample's minimal adversarial distance, and the robustness curve it gives.

A minimal-perturbation attack (kind ``minimal``: DDN, CW, FMN, the PGD bisections ``pgd-bisect`` and
``pgd-refine``) is scored at eps = inf: that row holds the smallest adversarial example the attack found for the
sample, and its ``linf`` / ``l2`` columns are the distance. :func:`minimal_distances` is the one owner of "a sample's minimal distance": the
minimum over every minimal attack, backend and routing gradient of the norm's column over rows that fooled the
deployed model (``success``), and over the fixed-eps successes of the same model, norm and routing gradient (an
example the PGD at 0.75/255 found caps a distance the minimal attack put at 4.95/255), with two conventions:

- a sample the model misclassifies clean has distance 0 (it is not robust at any eps);
- a clean-correct sample no attack fooled has distance ``inf`` (``found`` False): robust at every eps *as far as
  the attacks tell*, which is an upper bound, like every number here.

The robustness curve ``robust_acc(eps) = share of samples with distance > eps`` follows (an example of norm <= eps
exists exactly for the others, the rule :func:`attacks.tracking.within_budgets` scores fixed budgets by), with a
pointwise 95% Wilson band. Every distance is the norm of an adversarial example the runner re-scored on the
deployed model and budget-checked, so the curve is an upper bound on true robust accuracy at every eps.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from attacks.base import MINIMAL, attack_kind
from attacks.records import accuracy_rows
from robustness.analysis.selection import whitebox
from robustness.analysis.stats import Interval, bootstrap_many, wilson_interval
from robustness.analysis.verdict import ONE_SEED, Effect, Health, PairedTest, PairVerdict, classify, judge
from robustness.core.norms import NORM_NAMES, norm_for

#: Keys of one set of distances (one model in one gate mode, head and norm).
DISTANCE_KEYS: list[str] = ["run", "model", "gate_mode", "target", "norm"]
DISTANCE_COLUMNS: list[str] = ["sample", "clean_correct", "found", "distance", "attack"]


def minimal_rows(records: pd.DataFrame) -> pd.DataFrame:
    """White-box rows of minimal-kind attacks at eps = inf (each sample's smallest example per attack)."""
    wb = whitebox(records)
    if wb.empty:
        return wb
    minimal = wb["attack"].astype(str).map(lambda a: attack_kind(a) == MINIMAL).to_numpy(bool)
    return wb[minimal & np.isinf(wb["eps"].to_numpy(float))]


def evidence_rows(records: pd.DataFrame, by_grad: bool = False) -> pd.DataFrame:
    """:func:`minimal_rows`, and the fixed-eps rows (eps finite and > 0) of accuracy attacks of the same keys
    (:data:`DISTANCE_KEYS`, + ``gate_grad`` when ``by_grad``): a fixed-budget success is an adversarial example
    too, whose norm caps the sample's minimal distance. Keys without a minimal attack add nothing: a distance is
    only reported where a minimal search ran."""
    minimal = minimal_rows(records)
    if minimal.empty:
        return minimal
    keys = DISTANCE_KEYS + (["gate_grad"] if by_grad else [])
    wb = accuracy_rows(whitebox(records))
    eps = wb["eps"].to_numpy(float)
    fixed = wb[np.isfinite(eps) & (eps > 0)]
    if fixed.empty:
        return minimal
    searched = pd.MultiIndex.from_frame(minimal[keys].astype(str)).unique()
    fixed = fixed[pd.MultiIndex.from_frame(fixed[keys].astype(str)).isin(searched)].copy()
    if fixed.empty:
        return minimal
    # an example the budget check accepted at eps is an example at eps: its norm can exceed eps by the float
    # tolerance (20.75/255 + 4e-9), which would count the sample robust at eps on the curve that eps broke
    for norm in NORM_NAMES:  # each norm's distance is the records' column of its name
        at = (fixed["norm"].astype(str) == norm).to_numpy()
        fixed.loc[at, norm] = np.minimum(fixed.loc[at, norm].to_numpy(float), fixed.loc[at, "eps"].to_numpy(float))
    return pd.concat([minimal, fixed], ignore_index=True)


def _own_norm(rows: pd.DataFrame) -> np.ndarray:
    """Each row's distance in its own norm: the column named after the row's ``norm`` (``l2`` for a norm this
    version does not know)."""
    names = rows["norm"].astype(str).to_numpy()
    value = rows["l2"].to_numpy(float).copy()
    for norm in NORM_NAMES:
        at = names == norm
        value[at] = rows.loc[at, norm].to_numpy(float)
    return value


def minimal_distances(records: pd.DataFrame, by_grad: bool = False, fixed: bool = True) -> pd.DataFrame:
    """Per sample the smallest verified adversarial distance in its norm, from all the evidence
    (:func:`evidence_rows`): the minimal attacks' examples and every fixed-eps success, so no fixed-eps success can
    lie below a reported minimal distance. ``fixed=False``: the minimal attacks' examples only (what ``--eps auto``
    places its grid by, so that a resume, which also reads the fixed-eps records, finds the same grid).

    One row per :data:`DISTANCE_KEYS` (+ ``gate_grad`` when ``by_grad``) + ``sample`` with ``clean_correct``,
    ``found`` (some minimal attack fooled the deployed model, or its logits stopped being finite there: a
    ``nonfinite`` row counts as broken at its measured norm, never as "never fooled"), ``distance`` (0 for
    clean-wrong, inf when nothing was found) and ``attack`` (``attack/backend/gate_grad`` of the row that gave the distance, '' when none).
    """
    keys = DISTANCE_KEYS + (["gate_grad"] if by_grad else [])
    rows = evidence_rows(records, by_grad) if fixed else minimal_rows(records)
    if rows.empty:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in keys + DISTANCE_COLUMNS})
    rows = rows.reset_index(drop=True)
    norm_value = _own_norm(rows)
    fooled = rows["success"].to_numpy(bool)
    if "nonfinite" in rows.columns:  # a correct sample whose model stops computing at this perturbation is broken
        fooled = fooled | (rows["nonfinite"].to_numpy(bool) & rows["clean_correct"].to_numpy(bool))
    frame = pd.DataFrame({
        **{k: rows[k].astype(str).to_numpy() for k in keys},
        "sample": rows["sample"].to_numpy(np.int64),
        "clean_correct": rows["clean_correct"].to_numpy(bool),
        "distance": np.where(fooled, norm_value, np.inf),
        "found": fooled,
        "attack": (rows["attack"].astype(str) + "/" + rows["backend"].astype(str) + "/"
                   + rows["gate_grad"].astype(str)).to_numpy(),
    })
    frame = frame.sort_values([*keys, "sample", "distance"], kind="stable")
    best = frame.groupby([*keys, "sample"], sort=True).head(1).copy()
    wrong = ~best["clean_correct"].to_numpy(bool)
    best.loc[wrong, "distance"] = 0.0
    best.loc[~best["found"].to_numpy(bool) & ~wrong, "attack"] = ""
    best.loc[wrong, "attack"] = "misclassified clean"
    return best[keys + DISTANCE_COLUMNS].reset_index(drop=True)


def _median_rows(x: np.ndarray) -> np.ndarray:
    """Row medians that tolerate inf (the mean of the two middle order statistics; inf + inf is inf)."""
    s = np.sort(x, axis=1)
    n = s.shape[1]
    if n == 0:
        return np.full(s.shape[0], np.nan)
    lo, hi = s[:, (n - 1) // 2], s[:, n // 2]
    with np.errstate(invalid="ignore"):
        return np.where(lo == hi, lo, (lo + hi) / 2)


def median_distance(distances: pd.DataFrame, n_boot: int = 1000, seed: int = 0,
                    confidence: float = 0.95) -> Interval:
    """Median minimal distance over the clean-correct samples of one group, with a percentile-bootstrap interval
    (the estimate is inf when more than half of them were never fooled)."""
    d = distances.loc[distances["clean_correct"].to_numpy(bool), "distance"].to_numpy(float)
    return bootstrap_many(lambda rows: _median_rows(rows)[:, None], [d], n_boot, seed, confidence)[0]


def curve_at(distance: np.ndarray, eps: Sequence[float]) -> np.ndarray:
    """Robust accuracy at each ``eps``: the share of samples whose distance exceeds it."""
    d = np.asarray(distance, float)
    return np.array([(d > e).mean() if len(d) else np.nan for e in eps])


def curve_grid(distances: pd.DataFrame, points: int = 200) -> np.ndarray:
    """Eps values at which a curve of ``distances`` changes (every finite positive distance; evenly thinned
    to at most ``points``), with 0 in front."""
    d = np.unique(distances["distance"].to_numpy(float))
    d = d[np.isfinite(d) & (d > 0)]
    if len(d) > points:
        d = d[np.linspace(0, len(d) - 1, points).round().astype(int)]
    return np.concatenate([[0.0], d])


def robustness_curve(distances: pd.DataFrame, eps: Sequence[float] | None = None, by_grad: bool = False,
                     confidence: float = 0.95) -> pd.DataFrame:
    """Robust accuracy as a function of eps per group, with pointwise Wilson bands.

    ``eps`` defaults to every point where a group's curve changes (:func:`curve_grid`). Columns:
    :data:`DISTANCE_KEYS` (+ ``gate_grad``), ``eps``, ``n``, ``robust_acc``, ``robust_acc_low``,
    ``robust_acc_high``.
    """
    keys = DISTANCE_KEYS + (["gate_grad"] if by_grad else [])
    out = []
    for key, g in distances.groupby(keys, sort=True):
        grid = curve_grid(g) if eps is None else np.asarray(eps, float)
        d = g["distance"].to_numpy(float)
        for e in grid:
            iv = wilson_interval(int((d > e).sum()), len(d), confidence)
            out.append({**dict(zip(keys, key)), "eps": float(e), "n": len(d), "robust_acc": iv.estimate,
                        "robust_acc_low": iv.low, "robust_acc_high": iv.high})
    return pd.DataFrame(out, columns=[*keys, "eps", "n", "robust_acc", "robust_acc_low", "robust_acc_high"])


# ---------------------------------------------------------------------------------------------------------------
# Two models' distances on the same samples
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistanceComparison:
    """Model A against model B on their shared samples, from minimal distances in one norm.

    ``ratio``: median over the samples both classify correctly of ``d_A / d_B`` (paired bootstrap interval;
    samples neither was fooled on count as ratio 1); ``wilcoxon_p``: two-sided signed-rank test of ``log d_A -
    log d_B`` on them (``wilcoxon_sign``: +1 when the signed ranks favour larger distances for A). The verdict
    (:meth:`verdict`, :mod:`robustness.analysis.verdict`) rests on these two. ``gap``: the area between the
    robustness curves over eps in [0, ``cap``] divided by ``cap`` (= the mean over that range of acc_A(eps) -
    acc_B(eps); clean-wrong samples count at distance 0; cap = the largest finite distance of either), paired
    bootstrap. ``eps_at``: the eps > 0 where the curves differ most; ``diff_at`` the difference there, whose
    interval re-selects that eps in every resample (so the selection does not make it look surer than it is).
    The curve statistics are details: they mix clean accuracy into robustness and decide no verdict.
    """

    a: str
    b: str
    norm: str
    n: int
    n_both_correct: int
    clean_a: Interval
    clean_b: Interval
    median_a: Interval
    median_b: Interval
    ratio: Interval
    wilcoxon_p: float
    gap: Interval
    cap: float
    eps_at: float
    acc_a_at: float
    acc_b_at: float
    diff_at: Interval
    wilcoxon_sign: int = 0

    def evidence(self) -> dict[str, str]:
        """Per statistic, for the details only: ``more`` (A more robust: the interval lies above no difference),
        ``less``, or ``none``. No verdict is read from this (see :meth:`verdict`)."""
        def side(iv: Interval, zero: float) -> str:
            return "more" if iv.low > zero else "less" if iv.high < zero else "none"
        return {"ratio": side(self.ratio, 1.0), "gap": side(self.gap, 0.0), "diff_at": side(self.diff_at, 0.0)}

    def effect(self) -> Effect:
        """The effect the verdict uses: the median distance ratio with its interval."""
        return Effect("median distance ratio", self.ratio.estimate, self.ratio.low, self.ratio.high, "ratio")

    def test(self) -> PairedTest:
        """The paired test the verdict uses: Wilcoxon signed-rank on the per-sample log distance ratios."""
        return PairedTest("Wilcoxon", self.wilcoxon_p, self.wilcoxon_sign, self.n_both_correct)

    def verdict(self, health: tuple[Health, Health] | None = None, samples: Sequence[str] = (),
                scope: str = ONE_SEED) -> PairVerdict:
        """The pair's verdict by the one rule (:func:`robustness.analysis.verdict.judge`): not comparable with
        fewer than ``MIN_BOTH_CORRECT`` samples correct on both (or the caller's ``samples`` reasons), confounded
        by clean accuracy (``health``; by default the clean accuracies on the shared samples, chance unknown),
        else the distance ratio and its Wilcoxon test against the negligible band."""
        if health is None:
            health = (Health(self.a, self.clean_a.estimate), Health(self.b, self.clean_b.estimate))
        return judge(self.a, self.b, self.effect(), self.test(), health=health, n_both_correct=self.n_both_correct,
                     samples=samples, scope=scope)

    def finding(self) -> str:
        """The verdict's kind (:data:`robustness.analysis.verdict.KINDS`) with the default guards."""
        return self.verdict().kind

    def direction(self) -> str:
        """The rule on the ratio and its test alone, without the guards: ``more``, ``less``, ``equivalent``,
        ``none`` or ``inconclusive``."""
        return classify(self.effect(), self.test())[0]


def _log_ratio(da: np.ndarray, db: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.log(da) - np.log(db)
    return np.where(np.isnan(lr), 0.0, lr)  # never fooled by either: no difference


def paired_log_ratios(dist_a: pd.DataFrame, dist_b: pd.DataFrame) -> pd.DataFrame:
    """Per sample both classify correctly: ``log d_A - log d_B`` (0 when neither was fooled; +-inf when only one
    was). Columns ``sample``, ``log_ratio``; what the distance verdict's ratio and test are computed on."""
    joined = dist_a[["sample", "clean_correct", "distance"]].merge(
        dist_b[["sample", "clean_correct", "distance"]], on="sample", suffixes=("_a", "_b"))
    both = joined["clean_correct_a"].to_numpy(bool) & joined["clean_correct_b"].to_numpy(bool)
    lr = _log_ratio(joined["distance_a"].to_numpy(float)[both], joined["distance_b"].to_numpy(float)[both])
    return pd.DataFrame({"sample": joined["sample"].to_numpy(np.int64)[both], "log_ratio": lr})


def _wilcoxon(x: np.ndarray) -> tuple[float, int]:
    """Two-sided Wilcoxon signed-rank p of ``x`` (zeros dropped) and the sign of R+ - R-."""
    x = x[x != 0]
    if len(x) == 0:
        return 1.0, 0
    finite = np.abs(x[np.isfinite(x)])
    big = (finite.max() if len(finite) else 1.0) * 2 + 1  # ranks only: an infinite ratio ranks highest
    x = np.where(np.isinf(x), np.sign(x) * big, x)
    ranks = stats.rankdata(np.abs(x))
    sign = int(np.sign(ranks[x > 0].sum() - ranks[x < 0].sum()))
    return float(stats.wilcoxon(x, zero_method="wilcox", alternative="two-sided").pvalue), sign


def _resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx]).astype(float)


def compare_distances(dist_a: pd.DataFrame, dist_b: pd.DataFrame, a: str = "A", b: str = "B", *,
                      n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> DistanceComparison | None:
    """Compare two models' minimal distances (:func:`minimal_distances` rows of one group each) on their shared
    samples; None when they share none."""
    norm = str(dist_a["norm"].iloc[0]) if len(dist_a) else ""
    joined = dist_a[["sample", "clean_correct", "distance"]].merge(
        dist_b[["sample", "clean_correct", "distance"]], on="sample", suffixes=("_a", "_b"))
    n = len(joined)
    if n == 0:
        return None
    ca, cb = joined["clean_correct_a"].to_numpy(bool), joined["clean_correct_b"].to_numpy(bool)
    da, db = joined["distance_a"].to_numpy(float), joined["distance_b"].to_numpy(float)
    both = ca & cb
    lr = paired_log_ratios(dist_a, dist_b)["log_ratio"].to_numpy(float)
    ratio = bootstrap_many(lambda rows: _median_rows(rows)[:, None], [lr], n_boot, seed, confidence)[0]
    ratio = Interval(*(float(np.exp(v)) for v in (ratio.estimate, ratio.low, ratio.high)), ratio.n)
    finite = np.concatenate([da[np.isfinite(da)], db[np.isfinite(db)]])
    cap = float(finite.max()) if len(finite) and finite.max() > 0 else float("nan")
    if np.isfinite(cap):
        gap = bootstrap_many(lambda rows: rows.mean(axis=1)[:, None],
                             [(np.minimum(da, cap) - np.minimum(db, cap)) / cap], n_boot, seed, confidence)[0]
    else:
        gap = Interval(float("nan"), float("nan"), float("nan"), n)
    grid = np.unique(finite[finite > 0])
    if len(grid) > 200:
        grid = grid[np.linspace(0, len(grid) - 1, 200).round().astype(int)]
    if len(grid):
        d = (da[:, None] > grid[None, :]).astype(float) - (db[:, None] > grid[None, :]).astype(float)
        curve_diff = d.mean(0)
        k = int(np.argmax(np.abs(curve_diff)))
        boot = _resample_weights(n, n_boot, seed) @ d / n if n_boot > 0 else np.empty((0, len(grid)))
        picked = boot[np.arange(len(boot)), np.argmax(np.abs(boot), axis=1)] if len(boot) else boot[:, 0]
        alpha = (1 - confidence) / 2
        low, high = np.quantile(picked, [alpha, 1 - alpha]) if len(picked) else (np.nan, np.nan)
        eps_at = float(grid[k])
        diff_at = Interval(float(curve_diff[k]), float(low), float(high), n)
        acc_a_at, acc_b_at = float((da > eps_at).mean()), float((db > eps_at).mean())
    else:
        eps_at, acc_a_at, acc_b_at = float("nan"), float("nan"), float("nan")
        diff_at = Interval(float("nan"), float("nan"), float("nan"), n)
    median = lambda d, c: median_distance(pd.DataFrame({"distance": d, "clean_correct": c}), n_boot, seed)  # noqa: E731
    p, sign = _wilcoxon(lr) if len(lr) else (float("nan"), 0)
    return DistanceComparison(
        a=a, b=b, norm=norm, n=n, n_both_correct=int(both.sum()),
        clean_a=wilson_interval(int(ca.sum()), n, confidence), clean_b=wilson_interval(int(cb.sum()), n, confidence),
        median_a=median(da, ca), median_b=median(db, cb), ratio=ratio,
        wilcoxon_p=p, gap=gap, cap=cap, eps_at=eps_at, acc_a_at=acc_a_at, acc_b_at=acc_b_at, diff_at=diff_at,
        wilcoxon_sign=sign)


# ---------------------------------------------------------------------------------------------------------------
# A fixed-eps grid where the models differ
# ---------------------------------------------------------------------------------------------------------------

#: Quantiles of the reference model's minimal distances that ``--eps auto`` puts its grid at.
AUTO_QUANTILES: tuple[float, ...] = (0.25, 0.5, 0.75)
#: Every model's curve must pass through this band at some grid point (else its median is added).
INFORMATIVE: tuple[float, float] = (0.1, 0.9)


def round_eps(value: float, norm: str) -> float:
    """A budget people can read and type (:meth:`robustness.core.norms.Norm.round_budget`): L-inf from 0.5/255 up
    to the nearest quarter of 1/255, below that (and L2) two significant digits (of 1/255 units for L-inf)."""
    return norm_for(norm).round_budget(value)


def auto_eps_grid(reference: pd.DataFrame, others: Sequence[pd.DataFrame] = (), norm: str = "linf",
                  quantiles: Sequence[float] = AUTO_QUANTILES) -> list[float]:
    """The fixed-eps grid at the ``quantiles`` of the reference model's minimal distances (clean-correct samples
    with a found example), rounded (:func:`round_eps`); for every other model (distances of one group each)
    whose curve lies outside :data:`INFORMATIVE` at every grid point, its own median distance is added.
    ConfigError-free: returns [] when the reference has no finite distance."""
    def found(d: pd.DataFrame) -> np.ndarray:
        x = d.loc[d["clean_correct"].to_numpy(bool), "distance"].to_numpy(float)
        return x[np.isfinite(x) & (x > 0)]

    ref = found(reference)
    if not len(ref):
        return []
    grid = {round_eps(float(q), norm) for q in np.quantile(ref, list(quantiles))}
    lo, hi = INFORMATIVE
    for other in others:
        acc = curve_at(other["distance"].to_numpy(float), sorted(grid))
        mine = found(other)
        if len(mine) and not ((acc >= lo) & (acc <= hi)).any():
            grid.add(round_eps(float(np.median(mine)), norm))
    return sorted(grid)
