"""Metrics over attack records: gate-path distances, per-block execution and flip rates, robust accuracy tables
with the per-sample worst case, and the compute a skipping model saves. (The one-row-per-evaluation summary and
its metric registry live in :mod:`robustness.analysis.summary`.)

Pure functions: records (``attacks.records`` contract) in, DataFrames out. Nothing here needs a model.
Conventions shared by every function:

- An *evaluation* is one group of :data:`attacks.records.EVAL_KEYS`.
- Accuracies, rates and shares are fractions in [0, 1]; ``dmacs_pct`` is in percent of ``full_macs``.
- *Success* is only defined on initially-correct samples (``clean_correct``); success rates and the association
  statistics are computed on those samples only. Path statistics use every sample.
- A statistic that is undefined for the data is ``NaN``; intervals follow :mod:`robustness.analysis.stats`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from attacks.adapters import NO_HEAD
from attacks.records import EVAL_KEYS, conform, minimal_at_budgets, worst_case
from robustness.analysis.selection import accuracy_rows, whitebox
from robustness.analysis.stats import mean_or_nan, put_interval, wilson_interval

#: Keys of a worst-case group (``attacks.records.worst_case``'s default grouping).
WORST_KEYS: list[str] = ["run", "model", "norm", "eps", "gate_mode", "target", "source_run"]


# ---------------------------------------------------------------------------------------------------------------
# Gate paths
# ---------------------------------------------------------------------------------------------------------------

def has_coarse_head(df: pd.DataFrame) -> bool:
    """Whether the records carry a coarse head: coarse predictions *and* coarse labels (a single-head model, or
    data without a label hierarchy, records ``attacks.adapters.NO_HEAD`` there). False for an empty frame."""
    if not len(df):
        return False
    return bool(((df["clean_pred_coarse"] != NO_HEAD) & (df["label_coarse"] != NO_HEAD)).any())


#: What a report says when the records have no coarse head (the coarse-only analyses are skipped, not faked).
SINGLE_HEAD_NOTE = ("single-head model (or data without coarse labels): the coarse-head analyses (coarse "
                    "accuracy, adversarial class in the true superclass) are skipped")


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
# Accuracy tables, worst case and compute
# ---------------------------------------------------------------------------------------------------------------

def worst_case_accuracy(df: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per-sample worst case over the white-box attacks that count for accuracy (``attacks.records.worst_case``),
    per eps.

    Columns: :data:`WORST_KEYS`, ``n``, ``n_attacks``, ``attacks`` (comma-separated attack names pooled),
    ``within_budget`` (the minimal-distance attacks with an example inside this budget, which the worst case
    counts too: :func:`attacks.records.minimal_at_budgets`; empty when none), ``clean_acc``, ``robust_acc``,
    ``robust_acc_low``, ``robust_acc_high`` (Wilson).
    """
    wb = accuracy_rows(whitebox(df))
    cols = WORST_KEYS + ["n", "n_attacks", "attacks", "within_budget", "clean_acc", "robust_acc", "robust_acc_low",
                         "robust_acc_high"]
    if wb.empty:
        return pd.DataFrame(columns=cols)
    worst = worst_case(wb)
    pooled, within = (frame.groupby(WORST_KEYS, observed=True, dropna=False)["attack"].agg(
        lambda s: ",".join(sorted(set(s.astype(str))))) for frame in
        (wb, minimal_at_budgets(conform(wb), [k for k in WORST_KEYS if k != "eps"])))
    rows = []
    for key, g in worst.groupby(WORST_KEYS, sort=True, observed=True, dropna=False):
        row = dict(zip(WORST_KEYS, key))
        names = pooled.loc[key]
        iv = wilson_interval(int(g["robust"].sum()), len(g), confidence)
        row.update(n=len(g), n_attacks=len(names.split(",")), attacks=names,
                   within_budget=within.get(key, ""),
                   clean_acc=mean_or_nan(g["clean_correct"].to_numpy(bool)))
        put_interval(row, "robust_acc", iv)
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def robust_accuracy_table(df: pd.DataFrame, include_worst: bool = True, confidence: float = 0.95,
                          worst: pd.DataFrame | None = None) -> pd.DataFrame:
    """Tidy robust accuracy per evaluation (and per eps): :data:`EVAL_KEYS`, ``n``, ``robust_acc`` (+ Wilson
    ``_low``/``_high``); with ``include_worst``, worst-case rows (``attack='worst'``, ``backend='any'``,
    ``gate_grad='any'``) are appended: ``worst``, the records' :func:`worst_case_accuracy` when the caller has it
    (:class:`robustness.findings.run.RunAnalysis`), else computed here."""
    rows = []
    for key, g in df.groupby(EVAL_KEYS, sort=True, observed=True, dropna=False):
        row = dict(zip(EVAL_KEYS, key), n=len(g))
        put_interval(row, "robust_acc", wilson_interval(int(g["robust"].sum()), len(g), confidence))
        rows.append(row)
    cols = EVAL_KEYS + ["n", "robust_acc", "robust_acc_low", "robust_acc_high"]
    table = pd.DataFrame(rows, columns=cols)
    if include_worst and not df.empty:
        worst = (worst_case_accuracy(df, confidence) if worst is None else worst).assign(
            attack="worst", backend="any", gate_grad="any")
        table = pd.concat([table, worst[cols]], ignore_index=True) if len(table) else worst[cols]
    return table


def compute_saved(df: pd.DataFrame, full_macs: float | None) -> float:
    """1 - mean(clean_macs) / full_macs, each (run, gate_mode, sample) counted once (NaN without full_macs)."""
    if not full_macs or df.empty:
        return float("nan")
    per_sample = df.drop_duplicates(["run", "gate_mode", "sample"])
    return 1.0 - float(per_sample["clean_macs"].mean()) / float(full_macs)
