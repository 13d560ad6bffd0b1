"""Statistics with intervals: Wilson proportions, the vectorised bootstrap, association of a predictor with
success (point-biserial r, AUROC), paired differences between two runs' records, and what the verdict rule
(``robustness.analysis.verdict``) rests on: the exact McNemar test, the seed-level sign-flip test and the
hierarchical bootstrap over training seeds and samples.

Pure functions of arrays and record frames. Conventions:

- A statistic that is undefined for the data (no samples, a constant outcome or predictor) is ``NaN``.
- Confidence intervals are 95% by default: Wilson for proportions, percentile bootstrap otherwise (a seeded
  ``numpy.random.Generator``; resamples on which the statistic is undefined are dropped).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

#: Keys on which two runs' records are paired (besides ``sample``).
PAIR_KEYS: list[str] = ["attack", "norm", "eps", "target"]

_BOOT_CELLS = 2_000_000  # bootstrap index cells materialised at once


@dataclass(frozen=True)
class Interval:
    """A point estimate with a confidence interval; all NaN when undefined."""

    estimate: float
    low: float
    high: float
    n: int = 0

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in [low, high] (False for an undefined interval)."""
        return bool(self.low <= value <= self.high)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Proportion ``successes / n`` with its Wilson score interval (NaN when ``n == 0``)."""
    if n <= 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return Interval(successes / n, float(ci.low), float(ci.high), int(n))


def put_interval(row: dict, name: str, iv: Interval) -> None:
    """Store ``iv`` in ``row`` as the columns ``name``, ``name_low``, ``name_high``."""
    row[name], row[f"{name}_low"], row[f"{name}_high"] = iv.estimate, iv.low, iv.high


def mean_or_nan(x: np.ndarray) -> float:
    """The mean of ``x``; NaN when it is empty."""
    return float(np.mean(x)) if len(x) else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Vectorised statistics (rows = resamples) and the bootstrap
# ---------------------------------------------------------------------------------------------------------------

def _level_counts(codes: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: how many negatives and positives sit at each of the ``k`` predictor levels (rows x k each)."""
    b = codes.shape[0]
    flat = codes.astype(np.int64) + k * (y > 0.5) + (2 * k) * np.arange(b)[:, None]
    c = np.bincount(flat.ravel(), minlength=b * 2 * k).reshape(b, 2, k).astype(float)
    return c[:, 0, :], c[:, 1, :]


def _auroc_counts(neg: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Mann-Whitney U / (n1 n0) per row (ties count half); NaN if a class is empty or the predictor is constant."""
    n0, n1 = neg.sum(axis=1), pos.sum(axis=1)
    below = np.cumsum(neg, axis=1) - neg
    u = (pos * (below + 0.5 * neg)).sum(axis=1)
    levels = ((neg + pos) > 0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0) & (levels > 1), auc, np.nan)


def _pointbiserial_counts(neg: np.ndarray, pos: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Pearson r of predictor level ``values`` with the binary outcome per row (== scipy.stats.pointbiserialr);
    NaN if the outcome or the predictor is constant."""
    tot = neg + pos
    n, n1 = tot.sum(axis=1), pos.sum(axis=1)
    levels = (tot > 0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        dev = values[None, :] - ((tot * values).sum(axis=1) / n)[:, None]
        sxx = (tot * dev * dev).sum(axis=1)
        sxy = (pos * dev).sum(axis=1)
        syy = n1 * (n - n1) / n
        r = sxy / np.sqrt(sxx * syy)
    return np.where((levels > 1) & (n1 > 0) & (n1 < n), r, np.nan)


def _mean_rows(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=1)


def bootstrap_many(stat: Callable[..., np.ndarray], arrays: Sequence[np.ndarray], n_boot: int = 1000,
                   seed: int = 0, confidence: float = 0.95) -> list[Interval]:
    """Point estimates of the ``m`` statistics ``stat`` computes on ``arrays``, each with a percentile bootstrap
    interval, all from the same resamples.

    ``stat(*rows)`` takes 2-D arrays (one resample per row) and returns an array of shape (rows, m). Resampling is
    paired: every array is indexed with the same resampled sample indices. Undefined resamples (NaN) are dropped.
    """
    nan = float("nan")
    arrays = [np.asarray(a, dtype=float) for a in arrays]
    n = len(arrays[0]) if arrays else 0
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # statistics of zero samples are NaN, quietly
        est = np.asarray(stat(*[a[None, :] for a in arrays]), dtype=float)[0]
    if n == 0:
        return [Interval(nan, nan, nan, 0) for _ in est]
    if n_boot <= 0 or not np.isfinite(est).any():
        return [Interval(float(e), nan, nan, n) for e in est]
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CELLS // n)
    parts = []
    for start in range(0, n_boot, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_boot - start), n))
        parts.append(np.asarray(stat(*[a[idx] for a in arrays]), dtype=float))
    boot = np.concatenate(parts)
    alpha = (1.0 - confidence) / 2.0
    out = []
    for j, e in enumerate(est):
        col = boot[:, j][np.isfinite(boot[:, j])]
        if not np.isfinite(e) or not len(col):
            out.append(Interval(float(e), nan, nan, n))
            continue
        low, high = np.quantile(col, [alpha, 1.0 - alpha])
        out.append(Interval(float(e), float(low), float(high), n))
    return out


def bootstrap(stat: Callable[..., np.ndarray], arrays: Sequence[np.ndarray], n_boot: int = 1000, seed: int = 0,
              confidence: float = 0.95) -> Interval:
    """Point estimate of ``stat`` (2-D rows in, one value per row out) with a percentile bootstrap interval."""
    return bootstrap_many(lambda *rows: np.asarray(stat(*rows))[:, None], arrays, n_boot, seed, confidence)[0]


def association(x: Sequence[float], success: Sequence[bool], n_boot: int = 1000, seed: int = 0,
                confidence: float = 0.95) -> tuple[Interval, Interval]:
    """(point-biserial r, AUROC) of predictor ``x`` for binary ``success``, with bootstrap intervals from shared
    resamples. AUROC is Mann-Whitney U / (n1 n0) with ties counting half; each is NaN when undefined."""
    values, codes = np.unique(np.asarray(x, dtype=float), return_inverse=True)
    k = len(values)

    def stat(code_rows: np.ndarray, y_rows: np.ndarray) -> np.ndarray:
        neg, pos = _level_counts(code_rows, y_rows, k)
        return np.column_stack([_pointbiserial_counts(neg, pos, values), _auroc_counts(neg, pos)])

    r, auc = bootstrap_many(stat, [codes, np.asarray(success, float)], n_boot, seed, confidence)
    return r, auc


def pointbiserial(x: Sequence[float], success: Sequence[bool], n_boot: int = 1000, seed: int = 0,
                  confidence: float = 0.95) -> Interval:
    """Point-biserial r between predictor ``x`` and binary ``success``, with a bootstrap interval."""
    return association(x, success, n_boot, seed, confidence)[0]


def auroc(x: Sequence[float], success: Sequence[bool], n_boot: int = 1000, seed: int = 0,
          confidence: float = 0.95) -> Interval:
    """AUROC of predictor ``x`` for ``success`` (Mann-Whitney U / (n1 n0), ties count half), with a bootstrap
    interval."""
    return association(x, success, n_boot, seed, confidence)[1]


def bootstrap_mean(values: Sequence[float], n_boot: int = 1000, seed: int = 0,
                   confidence: float = 0.95) -> Interval:
    """Mean of ``values`` with a percentile bootstrap interval."""
    return bootstrap(_mean_rows, [np.asarray(values, float)], n_boot, seed, confidence)


# ---------------------------------------------------------------------------------------------------------------
# Paired differences between runs
# ---------------------------------------------------------------------------------------------------------------

def paired_difference(df_a: pd.DataFrame, df_b: pd.DataFrame, keys: Sequence[str] = tuple(PAIR_KEYS),
                      n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """Robust accuracy of A minus B on the samples both evaluated, per ``keys`` group, paired bootstrap interval.

    Each side must hold at most one row per ``keys`` + ``sample`` (collapse with ``selection.strongest_per_sample``
    or ``worst_case`` first); raises ``ValueError`` otherwise. Columns: ``keys``, ``n`` (paired samples),
    ``acc_a``, ``acc_b``, ``diff`` (acc_a - acc_b, a fraction), ``diff_low``, ``diff_high``.
    """
    keys = list(keys)
    on = keys + ["sample"]
    for name, side in (("A", df_a), ("B", df_b)):
        if side.duplicated(on).any():
            raise ValueError(f"records {name} hold several rows per {'/'.join(on)}; collapse them first "
                             "(strongest_per_sample or worst_case)")
    a = df_a[on + ["robust"]].astype({"robust": bool})
    b = df_b[on + ["robust"]].astype({"robust": bool})
    joined = a.merge(b, on=on, suffixes=("_a", "_b"))
    rows = []
    for key, g in joined.groupby(keys, sort=True, observed=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        ya, yb = g["robust_a"].to_numpy(float), g["robust_b"].to_numpy(float)
        iv = bootstrap_mean(ya - yb, n_boot, seed, confidence)
        rows.append(dict(zip(keys, key), n=len(g), acc_a=ya.mean(), acc_b=yb.mean(), diff=iv.estimate,
                         diff_low=iv.low, diff_high=iv.high))
    return pd.DataFrame(rows, columns=keys + ["n", "acc_a", "acc_b", "diff", "diff_low", "diff_high"])



# ---------------------------------------------------------------------------------------------------------------
# Paired tests behind a verdict (robustness.analysis.verdict) and the hierarchical bootstrap over seeds
# ---------------------------------------------------------------------------------------------------------------

def mcnemar_test(robust_a: Sequence[bool], robust_b: Sequence[bool]) -> tuple[float, int, int, int]:
    """Exact two-sided McNemar test of paired binary outcomes: (p, sign, b, c) with ``b`` = A only, ``c`` = B only
    (binomial test of b among the b + c discordant pairs at 1/2; p = 1 without discordant pairs) and sign =
    sign(b - c)."""
    a, b_ = np.asarray(robust_a, bool), np.asarray(robust_b, bool)
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    p = float(stats.binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
    return p, int(np.sign(b - c)), b, c


def sign_flip_test(values: Sequence[float], n_perm: int = 100_000, seed: int = 0) -> tuple[float, int]:
    """Two-sided one-sample sign-flip permutation test that ``values`` (e.g. one effect per training seed) are
    centred at 0: (p, sign of their mean). Exact over all 2^k sign patterns for k <= 16 (its smallest p is
    2 / 2^k), Monte Carlo with ``n_perm`` seeded draws above. Infinite values rank beyond every finite one.
    (1.0, 0) for no values."""
    x = np.asarray(values, float)
    x = x[~np.isnan(x)]
    k = len(x)
    if k == 0:
        return 1.0, 0
    finite = np.abs(x[np.isfinite(x)])
    big = (finite.max() if len(finite) else 1.0) * (k + 1) + 1
    x = np.where(np.isinf(x), np.sign(x) * big, x)
    observed = abs(x.mean())
    if k <= 16:
        patterns = 1 - 2 * ((np.arange(2 ** k)[:, None] >> np.arange(k)[None, :]) & 1)
    else:
        patterns = np.random.default_rng(seed).choice([-1, 1], size=(n_perm, k))
    means = np.abs(patterns @ x) / k
    p = float(np.mean(means >= observed * (1 - 1e-12) - 1e-15))
    return min(1.0, p), int(np.sign(x.mean()))


def weighted_median_rows(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per row of ``weights`` (resamples x n counts) the median of ``values`` repeated by those counts (the mean
    of the two middle order statistics, as ``np.median``; inf-tolerant); NaN for an all-zero row."""
    order = np.argsort(values, kind="stable")
    v, w = np.asarray(values, float)[order], np.asarray(weights, float)[:, order]
    total = w.sum(axis=1)
    cum = np.cumsum(w, axis=1)
    k_lo, k_hi = np.floor((total - 1) / 2), np.floor(total / 2)
    i_lo = np.minimum((cum > k_lo[:, None]).argmax(axis=1), len(v) - 1)
    i_hi = np.minimum((cum > k_hi[:, None]).argmax(axis=1), len(v) - 1)
    lo, hi = v[i_lo], v[i_hi]
    with np.errstate(invalid="ignore"):
        med = np.where(lo == hi, lo, (lo + hi) / 2)
    return np.where(total > 0, med, np.nan)


def hierarchical_bootstrap(groups: Sequence[Sequence[float]], ids: Sequence[Sequence[int]] | None = None, *,
                           stat: Callable[[np.ndarray, np.ndarray], np.ndarray] = weighted_median_rows,
                           n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> Interval:
    """A statistic of the pooled values of several groups (training seeds) with a two-level percentile-bootstrap
    interval: each resample draws the groups with replacement, then samples with replacement within each drawn
    group, and computes ``stat`` on the pooled resample. Deterministic for a ``seed``.

    ``ids`` (one array of sample ids per group, e.g. test-image indices) says that the groups measured the same
    samples (a crossed design: every seed attacks the same images): then one resample of the ids is drawn per
    bootstrap replicate and used for every drawn group (Owen's "pigeonhole" bootstrap), so that image-level
    variation is not counted once per seed as if each seed had fresh images. Without ``ids`` the samples of each
    drawn group are resampled independently (a nested design).

    ``stat(values, weights)`` gets the pooled values (n,) and resample counts (rows x n) and returns one value per
    row (default: the weighted median). Resamples where it is undefined (not finite) are dropped; the estimate is
    ``stat`` with every count 1.
    """
    nan = float("nan")
    arrays = [np.asarray(g, float) for g in groups]
    keep = [i for i, g in enumerate(arrays) if len(g)]
    arrays = [arrays[i] for i in keep]
    values = np.concatenate(arrays) if arrays else np.empty(0)
    n = len(values)
    if n == 0:
        return Interval(nan, nan, nan, 0)
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        est = float(np.asarray(stat(values, np.ones((1, n))), float)[0])
    if n_boot <= 0 or not np.isfinite(est):
        return Interval(est, nan, nan, n)
    k = len(arrays)
    sizes = np.array([len(g) for g in arrays])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    group_of = np.repeat(np.arange(k), sizes)
    if ids is not None:
        id_arrays = [np.asarray(ids[i], np.int64) for i in keep]
        if [len(x) for x in id_arrays] != sizes.tolist():
            raise ValueError("ids must hold one id per value of each group")
        universe, id_code = np.unique(np.concatenate(id_arrays), return_inverse=True)
        m = len(universe)
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CELLS // max(n, 1))
    parts = []
    for start in range(0, n_boot, chunk):
        rows = min(chunk, n_boot - start)
        drawn = rng.integers(0, k, size=(rows, k))
        times = np.stack([np.bincount(r, minlength=k) for r in drawn]).astype(float)   # rows x groups
        if ids is not None:
            picks = rng.integers(0, m, size=(rows, m)) + m * np.arange(rows)[:, None]
            id_counts = np.bincount(picks.ravel(), minlength=rows * m).reshape(rows, m).astype(float)
            weights = times[:, group_of] * id_counts[:, id_code]
        else:
            flat = np.zeros(rows * n)
            for j in range(k):                       # draw position j: a group, resampled within itself
                for g in range(k):
                    sel = np.flatnonzero(drawn[:, j] == g)
                    if not len(sel):
                        continue
                    idx = rng.integers(0, sizes[g], size=(len(sel), sizes[g])) + offsets[g] + n * sel[:, None]
                    flat += np.bincount(idx.ravel(), minlength=rows * n)
            weights = flat.reshape(rows, n)
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            parts.append(np.asarray(stat(values, weights), float))
    boot = np.concatenate(parts)
    boot = boot[np.isfinite(boot)]
    if not len(boot):
        return Interval(est, nan, nan, n)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return Interval(est, float(low), float(high), n)
