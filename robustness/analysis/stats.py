"""Statistics with intervals: Wilson proportions, the vectorised bootstrap, association of a predictor with
success (point-biserial r, AUROC), and paired differences between two runs' records.

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

