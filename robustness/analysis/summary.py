"""The per-evaluation summary: one row of metrics per evaluation, built from a registry of metric functions.

A *metric* is a function ``(Evaluation) -> {column: value}`` registered with :func:`register_metric` together with
the description of each column it adds; :func:`summarize` calls every registered metric, in registration order,
on every evaluation (one group of :data:`attacks.records.EVAL_KEYS`). Adding a metric is one function in one file::

    @register_metric({"flip_share": "share of samples whose path changed and prediction flipped"})
    def flip_share(ev: Evaluation) -> dict[str, float]:
        ...

Conventions: accuracies, rates and shares are fractions in [0, 1]; the coarse-head metrics are NaN for records
without a coarse head (a single-head model or data without coarse labels: ``metrics.has_coarse_head``); *success* is
only defined on initially-correct samples (``clean_correct``), so success rates and association statistics use those
samples only, path statistics use every sample; an undefined statistic is ``NaN``; an interval metric ``x`` comes as
``x``, ``x_low``, ``x_high``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from attacks.adapters import NO_HEAD
from attacks.records import EVAL_KEYS, carried
from robustness.analysis.metrics import has_coarse_head, path_distances, path_matrix
from robustness.analysis.stats import Interval, association, mean_or_nan, put_interval, wilson_interval

NAN = float("nan")
Metric = Callable[["Evaluation"], dict]


@dataclass(frozen=True)
class Evaluation:
    """One evaluation's records and what its metrics share (computed once, on first use)."""

    records: pd.DataFrame
    full_macs: float = NAN
    fine_to_coarse: Sequence[int] | None = None
    n_boot: int = 1000
    seed: int = 0
    confidence: float = 0.95

    @cached_property
    def correct(self) -> np.ndarray:
        """Initially-correct samples (clean prediction of the target head is right)."""
        return self.records["clean_correct"].to_numpy(bool)

    @cached_property
    def success(self) -> np.ndarray:
        """Successful attacks: initially correct and adversarially wrong."""
        return self.records["success"].to_numpy(bool) & self.correct

    @cached_property
    def coarse(self) -> bool:
        """Whether the records carry a coarse head (predictions and labels)."""
        return has_coarse_head(self.records)

    @cached_property
    def clean_bits(self) -> np.ndarray:
        return path_matrix(self.records["clean_path"])

    @cached_property
    def adv_bits(self) -> np.ndarray:
        return path_matrix(self.records["adv_path"])

    @property
    def gated(self) -> bool:
        return self.clean_bits.shape[1] > 0

    @cached_property
    def distances(self) -> pd.DataFrame:
        return path_distances(self.records["clean_path"], self.records["adv_path"])

    @cached_property
    def hamming(self) -> np.ndarray:
        return self.distances["hamming"].to_numpy(float)

    @cached_property
    def dmacs(self) -> np.ndarray:
        return (self.records["adv_macs"] - self.records["clean_macs"]).to_numpy(float)


_METRICS: list[Metric] = []
#: Columns of :func:`summarize` after the :data:`EVAL_KEYS`, with their descriptions (filled by registration).
SUMMARY_COLUMNS: dict[str, str] = {"n": "samples in the evaluation"}


def register_metric(columns: Mapping[str, str]) -> Callable[[Metric], Metric]:
    """Decorator: add a metric to every summary; ``columns`` names and describes the columns it returns."""
    def add(fn: Metric) -> Metric:
        clash = sorted(set(columns) & set(SUMMARY_COLUMNS))
        if clash:
            raise ValueError(f"metric {fn.__name__}: column(s) {', '.join(clash)} already exist")
        _METRICS.append(fn)
        SUMMARY_COLUMNS.update(columns)
        return fn
    return add


def unregister_metric(fn: Metric, columns: Sequence[str]) -> None:
    """Remove a registered metric and its columns (for plug-ins and tests)."""
    _METRICS.remove(fn)
    for c in columns:
        SUMMARY_COLUMNS.pop(c, None)


def summarize_group(g: pd.DataFrame, full_macs: float = NAN, fine_to_coarse: Sequence[int] | None = None,
                    n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict[str, float]:
    """Every registered metric of one evaluation's records (without the key columns)."""
    ev = Evaluation(g, full_macs, fine_to_coarse, n_boot, seed, confidence)
    row: dict[str, float] = {"n": len(g)}
    for metric in _METRICS:
        row.update(metric(ev))
    return row


def _full_macs_for(full_macs: float | Mapping[str, float] | None, run: str) -> float:
    if full_macs is None:
        return NAN
    if isinstance(full_macs, Mapping):
        value = full_macs.get(run)
        return float(value) if value else NAN
    return float(full_macs) if full_macs else NAN


def summarize(df: pd.DataFrame, full_macs: float | Mapping[str, float] | None = None,
              fine_to_coarse: Sequence[int] | None = None, n_boot: int = 1000, seed: int = 0,
              confidence: float = 0.95) -> pd.DataFrame:
    """One row per evaluation: :data:`EVAL_KEYS` then the :data:`SUMMARY_COLUMNS` metrics.

    ``full_macs`` is the all-blocks-executed cost, one number or a mapping from run name to number.
    ``fine_to_coarse[c]`` is the superclass of fine class ``c``; without it the superclass column is the proxy.
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
# The built-in metrics (registration order is column order)
# ---------------------------------------------------------------------------------------------------------------

@register_metric({
    "clean_acc_fine": "clean accuracy of the fine head",
    "clean_acc_coarse": "clean accuracy of the coarse head",
    "clean_acc": "clean accuracy of the target head",
    "robust_acc": "accuracy of the target head on adversarial inputs",
    "n_clean_correct": "initially-correct samples",
    "n_success": "successful attacks (initially correct, adversarially wrong)",
    "success_rate": "n_success / n_clean_correct",
    "n_own_success": "successful attacks whose example this attack found itself (under the attack cascade the "
                     "others were carried over from an earlier attack: attacks.runner.cascade)",
})
def accuracy(ev: Evaluation) -> dict[str, float]:
    g, correct, success = ev.records, ev.correct, ev.success
    own = success & ~carried(g)
    return {"clean_acc_fine": mean_or_nan((g["clean_pred_fine"] == g["label_fine"]).to_numpy(bool)),
            "clean_acc_coarse": mean_or_nan((g["clean_pred_coarse"] == g["label_coarse"]).to_numpy(bool))
            if ev.coarse else NAN,
            "clean_acc": mean_or_nan(correct), "robust_acc": mean_or_nan(g["robust"].to_numpy(bool)),
            "n_clean_correct": int(correct.sum()), "n_success": int(success.sum()),
            "success_rate": success.sum() / correct.sum() if correct.any() else NAN,
            "n_own_success": int(own.sum())}


@register_metric({
    "gated": "the records carry gate paths",
    "n_gates": "gates per path",
    "clean_exec_rate": "mean share of gated blocks executed on clean inputs",
    "adv_exec_rate": "mean share of gated blocks executed on adversarial inputs",
    "path_changed": "share of samples whose path changed",
    "hamming_mean": "mean Hamming distance clean vs adversarial path",
    "jaccard_mean": "mean Jaccard distance of the executed-block sets",
})
def path_change(ev: Evaluation) -> dict[str, float]:
    gated, some = ev.gated, ev.gated and len(ev.records) > 0
    return {"gated": gated, "n_gates": ev.clean_bits.shape[1],
            "clean_exec_rate": float(ev.clean_bits.mean()) if some else NAN,
            "adv_exec_rate": float(ev.adv_bits.mean()) if some else NAN,
            "path_changed": mean_or_nan(ev.hamming > 0) if gated else NAN,
            "hamming_mean": mean_or_nan(ev.hamming) if gated else NAN,
            "jaccard_mean": mean_or_nan(ev.distances["jaccard"].to_numpy()) if gated else NAN}


@register_metric({
    "clean_macs_mean": "mean MACs on clean inputs",
    "adv_macs_mean": "mean MACs on adversarial inputs",
    "dmacs_mean": "mean adv_macs - clean_macs",
    "dmacs_pct": "dmacs_mean in percent of full_macs (NaN without full_macs)",
})
def compute_change(ev: Evaluation) -> dict[str, float]:
    dmacs_mean = mean_or_nan(ev.dmacs)
    return {"clean_macs_mean": mean_or_nan(ev.records["clean_macs"].to_numpy(float)),
            "adv_macs_mean": mean_or_nan(ev.records["adv_macs"].to_numpy(float)), "dmacs_mean": dmacs_mean,
            "dmacs_pct": 100.0 * dmacs_mean / ev.full_macs if np.isfinite(ev.full_macs) else NAN}


@register_metric({
    "n_changed": "initially-correct samples whose path changed",
    "n_unchanged": "initially-correct samples whose path did not change",
    "p_success_changed": "P(success | path changed), Wilson interval",
    "p_success_unchanged": "P(success | path unchanged), Wilson interval",
    "r_hamming": "point-biserial r of Hamming distance with success, bootstrap interval",
    "auroc_hamming": "AUROC of Hamming distance for success, bootstrap interval",
    "r_dmacs": "point-biserial r of dMACs with success, bootstrap interval",
    "auroc_dmacs": "AUROC of dMACs for success, bootstrap interval",
})
def success_by_path(ev: Evaluation) -> dict[str, float]:
    correct = ev.correct
    changed, s = ev.hamming[correct] > 0, ev.success[correct]
    none = Interval(NAN, NAN, NAN, 0)
    row: dict[str, float] = {"n_changed": int(changed.sum()) if ev.gated else 0,
                             "n_unchanged": int((~changed).sum()) if ev.gated else 0}
    put_interval(row, "p_success_changed", wilson_interval(int(s[changed].sum()), int(changed.sum()),
                                                           ev.confidence) if ev.gated else none)
    put_interval(row, "p_success_unchanged", wilson_interval(int(s[~changed].sum()), int((~changed).sum()),
                                                             ev.confidence) if ev.gated else none)
    for name, x in (("hamming", ev.hamming[correct]), ("dmacs", ev.dmacs[correct])):
        r, a = association(x, s, ev.n_boot, ev.seed, ev.confidence) if ev.gated else (none, none)
        put_interval(row, f"r_{name}", r)
        put_interval(row, f"auroc_{name}", a)
    return row


@register_metric({"frozen_survival": "share of successes still wrong with the clean path frozen, Wilson interval"})
def frozen_survival(ev: Evaluation) -> dict[str, float]:
    frozen_wrong = ~ev.records["frozen_correct"].to_numpy(bool)[ev.success]
    row: dict[str, float] = {}
    put_interval(row, "frozen_survival", wilson_interval(int(frozen_wrong.sum()), int(ev.success.sum()),
                                                         ev.confidence))
    return row


@register_metric({
    "same_superclass": "share of successful fine attacks whose adversarial fine class is in the true superclass "
                       "(via fine_to_coarse); named same_superclass_proxy when the coarse head's prediction is "
                       "used instead (adv_pred_coarse == label_coarse)",
})
def same_superclass(ev: Evaluation) -> dict[str, float]:
    g = ev.records
    fine_success = ev.success if (g["target"] == "fine").all() else np.zeros(len(g), bool)
    labelled = (g["label_coarse"] != NO_HEAD).to_numpy(bool)
    if ev.fine_to_coarse and labelled.all():
        lookup = np.asarray(ev.fine_to_coarse, dtype=np.int64)
        same = lookup[g["adv_pred_fine"].to_numpy(np.int64)] == g["label_coarse"].to_numpy(np.int64)
        column = "same_superclass"
    elif ev.coarse:
        same = (g["adv_pred_coarse"] == g["label_coarse"]).to_numpy(bool)
        column = "same_superclass_proxy"
    else:  # neither a label hierarchy nor a coarse head: skipped (NaN), never counted as "not in the superclass"
        same, column, fine_success = np.zeros(len(g), bool), "same_superclass", np.zeros(len(g), bool)
    row: dict[str, float] = {}
    put_interval(row, column, wilson_interval(int(same[fine_success].sum()), int(fine_success.sum()),
                                              ev.confidence))
    return row
