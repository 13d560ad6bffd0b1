"""Gate-path metrics over attack records and their association with attack success.

Pure functions: records (``attacks.records`` contract) in, DataFrames or dataclasses out. Nothing here needs a
model. Conventions shared by every function:

- An *evaluation* is one group of :data:`attacks.records.EVAL_KEYS`.
- Accuracies, rates and shares are fractions in [0, 1]; ``dmacs_pct`` is in percent of ``full_macs``.
- *Success* is only defined on initially-correct samples (``clean_correct``); success rates and the association
  statistics are computed on those samples only. Path statistics use every sample.
- A statistic that is undefined for the data (no samples, a constant outcome or predictor) is ``NaN``.
- Confidence intervals are 95% by default: Wilson for proportions, percentile bootstrap otherwise (a seeded
  ``numpy.random.Generator``; resamples on which the statistic is undefined are dropped).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from attacks.records import EVAL_KEYS, worst_case

#: Attacks whose objective is not misclassification (compute or path attacks).
NON_ACCURACY_ATTACKS: frozenset[str] = frozenset({"slowdown", "path"})

#: Keys of a worst-case group (``attacks.records.worst_case``'s default grouping).
WORST_KEYS: list[str] = ["run", "model", "norm", "eps", "gate_mode", "target", "source_run"]

#: Keys on which two runs' records are paired (besides ``sample``).
PAIR_KEYS: list[str] = ["attack", "norm", "eps", "target"]

_BOOT_CELLS = 2_000_000  # bootstrap index cells materialised at once


# ---------------------------------------------------------------------------------------------------------------
# Small building blocks
# ---------------------------------------------------------------------------------------------------------------

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


def is_gated(df: pd.DataFrame) -> bool:
    """Whether any record carries a gate path (False for ungated models and empty frames)."""
    return bool(len(df)) and bool((df["clean_path"].str.len() > 0).any())


def path_matrix(paths: pd.Series | Sequence[str]) -> np.ndarray:
    """Boolean matrix (samples x gates) of executed blocks from bit strings; shape (n, 0) when paths are ''.

    Raises ``ValueError`` when the paths differ in length or hold characters other than '0' and '1'.
    """
    paths = pd.Series(paths, dtype="string").fillna("")
    n = len(paths)
    lengths = paths.str.len().to_numpy()
    width = int(lengths[0]) if n else 0
    if n and (lengths != width).any():
        raise ValueError(f"gate paths differ in length ({sorted(set(lengths.tolist()))}); mixed models in one group?")
    if width == 0:
        return np.zeros((n, 0), dtype=bool)
    raw = np.frombuffer("".join(paths.tolist()).encode("ascii"), dtype=np.uint8).reshape(n, width)
    if not np.isin(raw, (ord("0"), ord("1"))).all():
        raise ValueError("gate paths must be bit strings of '0' and '1'")
    return raw == ord("1")


def hamming_distance(a: str, b: str) -> int:
    """Number of gates whose bit differs between two equally long paths."""
    return int(path_distances(pd.Series([a]), pd.Series([b]))["hamming"].iloc[0])


def jaccard_distance(a: str, b: str) -> float:
    """1 - |A∩B| / |A∪B| of the sets of executed blocks; 0 when both paths execute nothing."""
    return float(path_distances(pd.Series([a]), pd.Series([b]))["jaccard"].iloc[0])


def path_distances(clean: pd.Series, adv: pd.Series) -> pd.DataFrame:
    """Per-sample ``hamming`` (int) and ``jaccard`` (float) distances between clean and adversarial paths."""
    a, b = path_matrix(clean), path_matrix(adv)
    if a.shape != b.shape:
        raise ValueError(f"clean and adversarial paths differ in shape: {a.shape} vs {b.shape}")
    union = (a | b).sum(axis=1)
    inter = (a & b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(union == 0, 0.0, 1.0 - inter / np.maximum(union, 1))
    return pd.DataFrame({"hamming": (a != b).sum(axis=1).astype(np.int64), "jaccard": jac})


def format_eps(eps: float) -> str:
    """``8/255`` for (near) multiples of 1/255 below 1, ``inf`` for unbounded, else a short decimal."""
    eps = float(eps)
    if np.isinf(eps):
        return "inf"
    if eps == 0:
        return "0"
    k = eps * 255
    if eps < 1 and round(k) >= 1 and abs(k - round(k)) <= 0.02:
        return f"{round(k)}/255"
    return f"{eps:.4g}"


def _mean(x: np.ndarray) -> float:
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


def bootstrap_many(stat, arrays: Sequence[np.ndarray], n_boot: int = 1000, seed: int = 0,
                   confidence: float = 0.95) -> list[Interval]:
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


def bootstrap(stat, arrays: Sequence[np.ndarray], n_boot: int = 1000, seed: int = 0,
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
# Per-evaluation summary
# ---------------------------------------------------------------------------------------------------------------

#: Columns of :func:`summarize` after the :data:`EVAL_KEYS` (``*_low``/``*_high`` are interval bounds).
SUMMARY_COLUMNS: dict[str, str] = {
    "n": "samples in the evaluation",
    "clean_acc_fine": "clean accuracy of the fine head",
    "clean_acc_coarse": "clean accuracy of the coarse head",
    "clean_acc": "clean accuracy of the target head",
    "robust_acc": "accuracy of the target head on adversarial inputs",
    "n_clean_correct": "initially-correct samples",
    "n_success": "successful attacks (initially correct, adversarially wrong)",
    "success_rate": "n_success / n_clean_correct",
    "gated": "the records carry gate paths",
    "n_gates": "gates per path",
    "clean_exec_rate": "mean share of gated blocks executed on clean inputs",
    "adv_exec_rate": "mean share of gated blocks executed on adversarial inputs",
    "path_changed": "share of samples whose path changed",
    "hamming_mean": "mean Hamming distance clean vs adversarial path",
    "jaccard_mean": "mean Jaccard distance of the executed-block sets",
    "clean_macs_mean": "mean MACs on clean inputs",
    "adv_macs_mean": "mean MACs on adversarial inputs",
    "dmacs_mean": "mean adv_macs - clean_macs",
    "dmacs_pct": "dmacs_mean in percent of full_macs (NaN without full_macs)",
    "n_changed": "initially-correct samples whose path changed",
    "p_success_changed": "P(success | path changed), Wilson interval",
    "n_unchanged": "initially-correct samples whose path did not change",
    "p_success_unchanged": "P(success | path unchanged), Wilson interval",
    "r_hamming": "point-biserial r of Hamming distance with success, bootstrap interval",
    "auroc_hamming": "AUROC of Hamming distance for success, bootstrap interval",
    "r_dmacs": "point-biserial r of dMACs with success, bootstrap interval",
    "auroc_dmacs": "AUROC of dMACs for success, bootstrap interval",
    "frozen_survival": "share of successes still wrong with the clean path frozen, Wilson interval",
    "same_superclass": "share of successful fine attacks whose adversarial fine class is in the true superclass "
                       "(via fine_to_coarse); named same_superclass_proxy when the coarse head's prediction is "
                       "used instead (adv_pred_coarse == label_coarse)",
}


def _put(row: dict, name: str, iv: Interval) -> None:
    row[name], row[f"{name}_low"], row[f"{name}_high"] = iv.estimate, iv.low, iv.high


def _full_macs_for(full_macs: float | Mapping[str, float] | None, run: str) -> float:
    if full_macs is None:
        return float("nan")
    if isinstance(full_macs, Mapping):
        value = full_macs.get(run)
        return float(value) if value else float("nan")
    return float(full_macs) if full_macs else float("nan")


def summarize_group(g: pd.DataFrame, full_macs: float = float("nan"),
                    fine_to_coarse: Sequence[int] | None = None, n_boot: int = 1000, seed: int = 0,
                    confidence: float = 0.95) -> dict[str, float]:
    """The :data:`SUMMARY_COLUMNS` metrics of one evaluation's records (without the key columns)."""
    nan = float("nan")
    row: dict[str, float] = {"n": len(g)}
    row["clean_acc_fine"] = _mean((g["clean_pred_fine"] == g["label_fine"]).to_numpy(bool))
    row["clean_acc_coarse"] = _mean((g["clean_pred_coarse"] == g["label_coarse"]).to_numpy(bool))
    correct = g["clean_correct"].to_numpy(bool)
    success = g["success"].to_numpy(bool) & correct
    row["clean_acc"] = _mean(correct)
    row["robust_acc"] = _mean(g["adv_correct"].to_numpy(bool))
    row["n_clean_correct"], row["n_success"] = int(correct.sum()), int(success.sum())
    row["success_rate"] = success.sum() / correct.sum() if correct.any() else nan

    clean_bits, adv_bits = path_matrix(g["clean_path"]), path_matrix(g["adv_path"])
    gated = clean_bits.shape[1] > 0
    row["gated"], row["n_gates"] = gated, clean_bits.shape[1]
    dist = path_distances(g["clean_path"], g["adv_path"])
    hamming = dist["hamming"].to_numpy(float)
    row["clean_exec_rate"] = float(clean_bits.mean()) if gated and len(g) else nan
    row["adv_exec_rate"] = float(adv_bits.mean()) if gated and len(g) else nan
    row["path_changed"] = _mean(hamming > 0) if gated else nan
    row["hamming_mean"] = _mean(hamming) if gated else nan
    row["jaccard_mean"] = _mean(dist["jaccard"].to_numpy()) if gated else nan

    dmacs = (g["adv_macs"] - g["clean_macs"]).to_numpy(float)
    row["clean_macs_mean"] = _mean(g["clean_macs"].to_numpy(float))
    row["adv_macs_mean"] = _mean(g["adv_macs"].to_numpy(float))
    row["dmacs_mean"] = _mean(dmacs)
    row["dmacs_pct"] = 100.0 * row["dmacs_mean"] / full_macs if np.isfinite(full_macs) else nan

    changed = hamming[correct] > 0
    s = success[correct]
    if gated:
        ch = wilson_interval(int(s[changed].sum()), int(changed.sum()), confidence)
        un = wilson_interval(int(s[~changed].sum()), int((~changed).sum()), confidence)
    else:
        ch = un = Interval(nan, nan, nan, 0)
    row["n_changed"], row["n_unchanged"] = (int(changed.sum()), int((~changed).sum())) if gated else (0, 0)
    _put(row, "p_success_changed", ch)
    _put(row, "p_success_unchanged", un)
    for name, x in (("hamming", hamming[correct]), ("dmacs", dmacs[correct])):
        if gated:
            r, a = association(x, s, n_boot, seed, confidence)
        else:
            r = a = Interval(nan, nan, nan, 0)
        _put(row, f"r_{name}", r)
        _put(row, f"auroc_{name}", a)

    frozen_wrong = ~g["frozen_correct"].to_numpy(bool)[success]
    _put(row, "frozen_survival", wilson_interval(int(frozen_wrong.sum()), int(success.sum()), confidence))

    fine_success = success if (g["target"] == "fine").all() else np.zeros(len(g), bool)
    if fine_to_coarse is not None:
        lookup = np.asarray(fine_to_coarse, dtype=np.int64)
        same = lookup[g["adv_pred_fine"].to_numpy(np.int64)] == g["label_coarse"].to_numpy(np.int64)
        column = "same_superclass"
    else:
        same = (g["adv_pred_coarse"] == g["label_coarse"]).to_numpy(bool)
        column = "same_superclass_proxy"
    _put(row, column, wilson_interval(int(same[fine_success].sum()), int(fine_success.sum()), confidence))
    return row


def summarize(df: pd.DataFrame, full_macs: float | Mapping[str, float] | None = None,
              fine_to_coarse: Sequence[int] | None = None, n_boot: int = 1000, seed: int = 0,
              confidence: float = 0.95) -> pd.DataFrame:
    """One row per evaluation: :data:`EVAL_KEYS` then the :data:`SUMMARY_COLUMNS` metrics.

    ``full_macs`` is the all-blocks-executed cost, one number or a mapping from run name to number.
    ``fine_to_coarse[c]`` is the superclass of fine class ``c``; without it the superclass column is the proxy.
    Interval columns come as ``<name>``, ``<name>_low``, ``<name>_high``.
    """
    rows = []
    for key, g in df.groupby(EVAL_KEYS, sort=True, observed=True, dropna=False):
        row = dict(zip(EVAL_KEYS, key))
        row.update(summarize_group(g, _full_macs_for(full_macs, str(row["run"])), fine_to_coarse, n_boot, seed,
                                   confidence))
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=EVAL_KEYS + list(SUMMARY_COLUMNS))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------------
# Per-block rates
# ---------------------------------------------------------------------------------------------------------------

def block_rates(df: pd.DataFrame, path_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Per evaluation and gated block: execution and flip rates (empty for ungated records).

    Columns: :data:`EVAL_KEYS`, ``block_index``, ``block`` (from ``path_names`` or ``gate<i>``), ``n``,
    ``clean_rate`` / ``adv_rate`` (share of samples executing the block), ``flip_01`` / ``flip_10`` (share of all
    samples whose bit went 0->1 / 1->0, so ``adv_rate - clean_rate == flip_01 - flip_10``), and
    ``flip_01_given_off`` / ``flip_10_given_on`` (the same flips conditioned on the clean bit; NaN if never so).
    """
    frames = []
    for key, g in df.groupby(EVAL_KEYS, sort=True, observed=True, dropna=False):
        a, b = path_matrix(g["clean_path"]), path_matrix(g["adv_path"])
        width = a.shape[1]
        if width == 0:
            continue
        names = list(path_names) if path_names is not None and len(path_names) == width else \
            [f"gate{i}" for i in range(width)]
        off, on = (~a).sum(axis=0), a.sum(axis=0)
        f01, f10 = (~a & b).sum(axis=0), (a & ~b).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            part = pd.DataFrame({
                "block_index": np.arange(width), "block": names, "n": len(g),
                "clean_rate": a.mean(axis=0), "adv_rate": b.mean(axis=0),
                "flip_01": f01 / len(g), "flip_10": f10 / len(g),
                "flip_01_given_off": np.where(off > 0, f01 / np.maximum(off, 1), np.nan),
                "flip_10_given_on": np.where(on > 0, f10 / np.maximum(on, 1), np.nan),
            })
        for k, v in zip(EVAL_KEYS, key):
            part.insert(EVAL_KEYS.index(k), k, v)
        frames.append(part)
    cols = EVAL_KEYS + ["block_index", "block", "n", "clean_rate", "adv_rate", "flip_01", "flip_10",
                        "flip_01_given_off", "flip_10_given_on"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)


# ---------------------------------------------------------------------------------------------------------------
# Accuracy tables and worst case
# ---------------------------------------------------------------------------------------------------------------

def whitebox(df: pd.DataFrame) -> pd.DataFrame:
    """The white-box rows (``source_run == ''``)."""
    return df[df["source_run"].fillna("") == ""]


def worst_case_accuracy(df: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per-sample worst case over all white-box attacks (``attacks.records.worst_case``), per eps.

    Columns: :data:`WORST_KEYS`, ``n``, ``n_attacks``, ``attacks`` (comma-separated attack names pooled),
    ``clean_acc``, ``robust_acc``, ``robust_acc_low``, ``robust_acc_high`` (Wilson).
    """
    wb = whitebox(df)
    cols = WORST_KEYS + ["n", "n_attacks", "attacks", "clean_acc", "robust_acc", "robust_acc_low",
                         "robust_acc_high"]
    if wb.empty:
        return pd.DataFrame(columns=cols)
    worst = worst_case(wb)
    pooled = wb.groupby(WORST_KEYS, observed=True, dropna=False)["attack"].agg(
        lambda s: ",".join(sorted(set(s.astype(str)))))
    rows = []
    for key, g in worst.groupby(WORST_KEYS, sort=True, observed=True, dropna=False):
        row = dict(zip(WORST_KEYS, key))
        names = pooled.loc[key]
        iv = wilson_interval(int(g["adv_correct"].sum()), len(g), confidence)
        row.update(n=len(g), n_attacks=len(names.split(",")), attacks=names,
                   clean_acc=_mean(g["clean_correct"].to_numpy(bool)))
        _put(row, "robust_acc", iv)
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def robust_accuracy_table(df: pd.DataFrame, include_worst: bool = True, confidence: float = 0.95) -> pd.DataFrame:
    """Tidy robust accuracy per evaluation (and per eps): :data:`EVAL_KEYS`, ``n``, ``robust_acc`` (+ Wilson
    ``_low``/``_high``); with ``include_worst``, worst-case rows (``attack='worst'``, ``backend='any'``,
    ``gate_grad='any'``) are appended."""
    rows = []
    for key, g in df.groupby(EVAL_KEYS, sort=True, observed=True, dropna=False):
        row = dict(zip(EVAL_KEYS, key), n=len(g))
        _put(row, "robust_acc", wilson_interval(int(g["adv_correct"].sum()), len(g), confidence))
        rows.append(row)
    cols = EVAL_KEYS + ["n", "robust_acc", "robust_acc_low", "robust_acc_high"]
    table = pd.DataFrame(rows, columns=cols)
    if include_worst and not df.empty:
        worst = worst_case_accuracy(df, confidence).assign(attack="worst", backend="any", gate_grad="any")
        table = pd.concat([table, worst[cols]], ignore_index=True) if len(table) else worst[cols]
    return table


def strongest_per_sample(df: pd.DataFrame) -> pd.DataFrame:
    """Records collapsed to one row per (run, model, attack, norm, eps, gate_mode, target, source_run, sample):
    the per-sample worst case over backends and routing gradients (``backend='any'``, ``gate_grad='any'``)."""
    if df.empty:
        return df.copy()
    parts = []
    for attack, sub in df.groupby("attack", sort=True, observed=True):
        w = worst_case(sub)
        w["attack"] = attack
        parts.append(w)
    return pd.concat(parts, ignore_index=True)


def accuracy_attacks(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of attacks that aim at misclassification (drops :data:`NON_ACCURACY_ATTACKS`)."""
    return df[~df["attack"].isin(list(NON_ACCURACY_ATTACKS))]


def primary_evaluation(df: pd.DataFrame) -> dict[str, str] | None:
    """The white-box attack family (run, attack, backend, norm, gate_mode, gate_grad, target) the per-run figures
    show: accuracy attacks first (compute/path attacks only when there is nothing else), then the most eps values,
    then the lowest mean robust accuracy over eps > 0; None when no white-box attack ran at eps > 0."""
    wb = whitebox(df)
    wb = wb[wb["eps"] > 0]
    if wb.empty:
        return None
    fam = ["run", "attack", "backend", "norm", "gate_mode", "gate_grad", "target"]
    scores = wb.assign(other=wb["attack"].isin(list(NON_ACCURACY_ATTACKS))).groupby(fam, observed=True).agg(
        other=("other", "first"), n_eps=("eps", "nunique"), acc=("adv_correct", "mean"))
    best = scores.sort_values(["other", "n_eps", "acc"], ascending=[True, False, True]).index[0]
    return {k: str(v) for k, v in zip(fam, best)}


def select(df: pd.DataFrame, where: Mapping[str, object]) -> pd.DataFrame:
    """Rows of ``df`` whose columns equal every value in ``where``."""
    mask = np.ones(len(df), dtype=bool)
    for k, v in where.items():
        mask &= (df[k] == v).fillna(False).to_numpy(bool)
    return df[mask]


# ---------------------------------------------------------------------------------------------------------------
# Comparing runs
# ---------------------------------------------------------------------------------------------------------------

def paired_difference(df_a: pd.DataFrame, df_b: pd.DataFrame, keys: Sequence[str] = tuple(PAIR_KEYS),
                      n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """Robust accuracy of A minus B on the samples both evaluated, per ``keys`` group, paired bootstrap interval.

    Each side must hold at most one row per ``keys`` + ``sample`` (collapse with :func:`strongest_per_sample` or
    ``worst_case`` first); raises ``ValueError`` otherwise. Columns: ``keys``, ``n`` (paired samples),
    ``acc_a``, ``acc_b``, ``diff`` (acc_a - acc_b, a fraction), ``diff_low``, ``diff_high``.
    """
    keys = list(keys)
    on = keys + ["sample"]
    for name, side in (("A", df_a), ("B", df_b)):
        if side.duplicated(on).any():
            raise ValueError(f"records {name} hold several rows per {'/'.join(on)}; collapse them first "
                             "(strongest_per_sample or worst_case)")
    a = df_a[on + ["adv_correct"]].astype({"adv_correct": bool})
    b = df_b[on + ["adv_correct"]].astype({"adv_correct": bool})
    joined = a.merge(b, on=on, suffixes=("_a", "_b"))
    rows = []
    for key, g in joined.groupby(keys, sort=True, observed=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        ya, yb = g["adv_correct_a"].to_numpy(float), g["adv_correct_b"].to_numpy(float)
        iv = bootstrap_mean(ya - yb, n_boot, seed, confidence)
        rows.append(dict(zip(keys, key), n=len(g), acc_a=ya.mean(), acc_b=yb.mean(), diff=iv.estimate,
                         diff_low=iv.low, diff_high=iv.high))
    return pd.DataFrame(rows, columns=keys + ["n", "acc_a", "acc_b", "diff", "diff_low", "diff_high"])


TRANSFER_PREFIX = "transfer:"
TRANSFER_KEYS: list[str] = ["source_run", "run", "attack", "norm", "eps", "gate_mode", "target"]


def transfer_matrix(frames: pd.DataFrame | Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Success rate of transferred examples by (source run -> target run), with white-box success on the diagonal.

    Uses rows with ``source_run != ''``; their attack name loses the ``transfer:`` prefix. For each target run
    and matching (attack, norm, eps, gate_mode, target), the run's own white-box success rate (per-sample worst case
    over backends and routing gradients) is added with ``source_run == run`` and ``whitebox=True``.
    Columns: :data:`TRANSFER_KEYS`, ``whitebox``, ``n_clean_correct``, ``n_success``, ``success_rate``.
    """
    df = frames if isinstance(frames, pd.DataFrame) else (
        pd.concat(list(frames), ignore_index=True) if len(frames) else pd.DataFrame())
    cols = TRANSFER_KEYS + ["whitebox", "n_clean_correct", "n_success", "success_rate"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    src = df["source_run"].fillna("")
    transfer = df[src != ""].copy()
    if transfer.empty:
        return pd.DataFrame(columns=cols)
    transfer["attack"] = transfer["attack"].str.removeprefix(TRANSFER_PREFIX)
    transfer = strongest_per_sample(transfer)
    wb = strongest_per_sample(whitebox(df))
    wanted = transfer[["run", "attack", "norm", "eps", "gate_mode", "target"]].drop_duplicates()
    wb = wb.merge(wanted, on=list(wanted.columns)) if not wb.empty else wb
    wb = wb.assign(source_run=wb["run"])
    rows = []
    for is_wb, part in ((False, transfer), (True, wb)):
        for key, g in part.groupby(TRANSFER_KEYS, sort=True, observed=True, dropna=False):
            correct = g["clean_correct"].to_numpy(bool)
            succ = int((g["success"].to_numpy(bool) & correct).sum())
            rows.append(dict(zip(TRANSFER_KEYS, key), whitebox=is_wb, n_clean_correct=int(correct.sum()),
                             n_success=succ, success_rate=succ / correct.sum() if correct.any() else float("nan")))
    return pd.DataFrame(rows, columns=cols).sort_values(TRANSFER_KEYS, ignore_index=True)


def compute_saved(df: pd.DataFrame, full_macs: float | None) -> float:
    """1 - mean(clean_macs) / full_macs, each (run, gate_mode, sample) counted once (NaN without full_macs)."""
    if not full_macs or df.empty:
        return float("nan")
    per_sample = df.drop_duplicates(["run", "gate_mode", "sample"])
    return 1.0 - float(per_sample["clean_macs"].mean()) / float(full_macs)
