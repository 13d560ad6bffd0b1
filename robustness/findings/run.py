"""A run's analysis, computed once: :class:`RunAnalysis`, built by :func:`analyse`.

Everything the consumers of one run read about it has one owner here: the sanity verdicts
(:func:`robustness.sanity.run_checks`, handed the zero-input-gradient share the attack measured and the gradient-free
query budget, both from the manifest), the worst case over attacks (:func:`metrics.worst_case_accuracy`), the
minimal distances (:func:`distances.minimal_distances`, over all routing gradients and per routing gradient), the
robustness curves, the gate statistics (the per-evaluation summary, the per-block rates), the headline, the attack
x eps pivot and the compute attacks' table. The run report (:mod:`reports.run_page`), :class:`robustness.app.api.Results`,
:func:`robustness.findings.compare.compare_runs`, the pipeline and ``dsn-robust attack``'s closing table read them
from here instead of computing their own.

Each part is computed on first use and then kept (the frozen dataclass's cached properties, as
:class:`robustness.analysis.summary.Evaluation` does for one evaluation), so a consumer pays only for what it reads
and nothing runs twice. The parts that bootstrap (the headline, the summary) are kept per ``(n_boot, seed)``.

:func:`analyse` keeps one analysis per run per process (the last :data:`CACHED_RUNS`): keyed by the
:class:`RunResults` object, its records object and row count, and the record shards on disk (name, size, mtime), so
a reloaded or grown run is analysed afresh and results handed over in memory are never confused with one another.
The frames an analysis holds are shared by every consumer: read them, never modify them in place.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from robustness.analysis.distances import minimal_distances, robustness_curve
from robustness.findings.headline import RunHeadline, run_headline
from robustness.analysis.metrics import block_rates, is_gated, robust_accuracy_table, worst_case_accuracy
from robustness.analysis.pivot import accuracy_pivot, compute_attack_table, headline_scope
from robustness.analysis.selection import accuracy_rows, strongest_per_sample, whitebox
from robustness.analysis.summary import summarize
from robustness.core.norms import NORM_NAMES
from robustness.core.rundir import RunDir
from robustness.results import RunResults
from robustness.sanity import Check, run_checks

#: analyses :func:`analyse` keeps in a process (the most recently used)
CACHED_RUNS = 32
#: the keys a figure's curve is selected by (gate mode, norm, head)
CURVE_KEYS = ["gate_mode", "norm", "target"]


@dataclass(frozen=True)
class GradCurves:
    """The robustness curves of the deployed gate mode, one per routing gradient plus their per-sample minimum
    (``variant`` ``any``; alone when there is one routing gradient), in the first norm (linf before l2) and head
    (fine first) that have minimal distances; ``fixed``: the fixed-eps worst case there (variant, eps, robust_acc),
    None when there is none."""

    gate_mode: str
    norm: str
    curves: pd.DataFrame
    fixed: pd.DataFrame | None


@dataclass(frozen=True, eq=False)
class RunAnalysis:
    """One run's analysis (see the module docstring): ``run`` and, when the caller measured it itself,
    ``zero_grad_share`` (replaces the manifest's measurement in the sanity checks)."""

    run: RunResults
    zero_grad_share: float | Mapping[str, float] | None = None
    _by_bootstrap: dict[tuple[str, int, int], Any] = field(default_factory=dict, repr=False)

    @property
    def records(self) -> pd.DataFrame:
        return self.run.records

    @cached_property
    def gated(self) -> bool:
        """Whether the records carry gate paths."""
        return is_gated(self.records)

    @cached_property
    def scope(self) -> dict[str, str] | None:
        """The deployed gate mode and head the headline, pivot and compute table describe
        (:func:`pivot.headline_scope`)."""
        return headline_scope(self.records)

    @cached_property
    def checks(self) -> tuple[Check, ...]:
        """The gradient-masking sanity checks, as the report and every comparison show them."""
        share = self.run.zero_grad_share if self.zero_grad_share is None else self.zero_grad_share
        queries = self.run.gradient_free_queries
        return tuple(run_checks(self.records, zero_grad_share=share,
                                queries={self.run.name: queries} if queries is not None else None,
                                minimal=self.minimal))

    @cached_property
    def worst_case(self) -> pd.DataFrame:
        """Per-sample worst case over the white-box accuracy attacks, per eps (:func:`metrics.worst_case_accuracy`)."""
        return worst_case_accuracy(self.records)

    @cached_property
    def minimal(self) -> pd.DataFrame:
        """Each sample's minimal adversarial distance, the minimum over attacks and routing gradients
        (:func:`distances.minimal_distances`)."""
        return minimal_distances(self.records)

    @cached_property
    def minimal_by_grad(self) -> pd.DataFrame:
        """The minimal distances per routing gradient (``minimal_distances(by_grad=True)``)."""
        return minimal_distances(self.records, by_grad=True)

    def minimal_in(self, by_grad: bool = False, **where: str) -> pd.DataFrame:
        """The minimal distances (per routing gradient with ``by_grad``) whose columns equal ``where``
        (``gate_mode="hard"``, ``target="fine"``): the frame :func:`distances.minimal_distances` gives for the
        records of ``where`` alone (its keys are per gate mode, head and norm)."""
        d = self.minimal_by_grad if by_grad else self.minimal
        mask = np.ones(len(d), dtype=bool)
        for column, value in where.items():
            mask &= (d[column].astype(str) == str(value)).to_numpy(bool)
        return d[mask].reset_index(drop=True) if where else d

    @cached_property
    def block_rates(self) -> pd.DataFrame:
        """Per evaluation and gated block: execution and flip rates (:func:`metrics.block_rates`)."""
        return block_rates(self.records, self.run.path_names)

    @cached_property
    def pivot(self) -> pd.DataFrame:
        """Robust accuracy per attack and eps in :attr:`scope`, with the worst-case row (:func:`pivot.accuracy_pivot`)."""
        return accuracy_pivot(self.records, self.scope, worst=self.worst_case)

    @cached_property
    def compute_attacks(self) -> pd.DataFrame | None:
        """The compute attacks' table in :attr:`scope`'s gate mode; None for an ungated model."""
        return compute_attack_table(self.records, self.run.full_macs, self.scope) if self.gated else None

    @cached_property
    def accuracy_curves(self) -> pd.DataFrame:
        """Robust accuracy per white-box accuracy attack (strongest backend and routing gradient per sample) and
        eps, with the worst case (``attack`` ``worst``): :func:`metrics.robust_accuracy_table`."""
        rows = strongest_per_sample(accuracy_rows(whitebox(self.records)))
        return robust_accuracy_table(rows, worst=self.worst_case)

    @cached_property
    def robustness_curves(self) -> GradCurves | None:
        """The curves the report's first figure draws (:class:`GradCurves`); None without minimal distances."""
        dist = self.minimal_by_grad
        if dist.empty:
            return None
        mode = "hard" if (dist["gate_mode"] == "hard").any() else str(dist["gate_mode"].iloc[0])
        norm = next((n for n in NORM_NAMES if (dist["norm"] == n).any()), NORM_NAMES[-1])  # linf before l2
        dist = dist[(dist["gate_mode"] == mode) & (dist["norm"] == norm)]
        target = "fine" if (dist["target"] == "fine").any() else dist["target"].iloc[0]
        dist = dist[dist["target"] == target]
        overall = self.minimal
        overall = overall[overall.set_index(CURVE_KEYS).index.isin(dist.set_index(CURVE_KEYS).index.unique())]
        curves = pd.concat([robustness_curve(dist, by_grad=True).rename(columns={"gate_grad": "variant"}),
                            robustness_curve(overall).assign(variant="any")], ignore_index=True)
        if curves["variant"].nunique() == 2:  # one routing gradient: its curve is the minimum
            curves = curves[curves["variant"] == "any"]
        worst = self.worst_case
        fixed = worst[(worst["norm"] == norm) & (worst["gate_mode"] == mode) & (worst["source_run"] == "")
                      & np.isfinite(worst["eps"].astype(float)) & (worst["eps"] > 0)] if len(worst) else worst
        if len(fixed) and "target" in fixed:
            fixed = fixed[fixed["target"] == target]
        points = fixed.assign(variant="any")[["variant", "eps", "robust_acc"]] if len(fixed) else None
        return GradCurves(mode, norm, curves, points)

    def headline(self, n_boot: int = 1000, seed: int = 0) -> RunHeadline:
        """The numbers the report opens with (:func:`headline.run_headline`), bootstrapped with ``n_boot``, ``seed``."""
        return self._kept("headline", n_boot, seed, lambda: run_headline(
            self.run, self.checks, n_boot=n_boot, seed=seed, worst_case=self.worst_case, minimal=self.minimal))

    def summary(self, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """One row of metrics per evaluation (:func:`summary.summarize`: accuracy, path and compute change, how
        path change relates to success), bootstrapped with ``n_boot``, ``seed``."""
        return self._kept("summary", n_boot, seed, lambda: summarize(
            self.records, self.run.full_macs, self.run.fine_to_coarse, n_boot=n_boot, seed=seed))

    def _kept(self, part: str, n_boot: int, seed: int, make: Any) -> Any:
        key = (part, int(n_boot), int(seed))
        if key not in self._by_bootstrap:
            self._by_bootstrap[key] = make()
        return self._by_bootstrap[key]


_CACHE: OrderedDict[tuple, RunAnalysis] = OrderedDict()


def _records_on_disk(run: RunResults) -> tuple:
    """(shard, size, mtime) of every record shard under the run directory, () when it holds none."""
    records = RunDir.at(run.path).records
    if not records.is_dir():
        return ()
    stamps = []
    for shard in sorted(records.rglob("*.parquet")):
        try:
            stat = shard.stat()
        except OSError:  # removed while we looked: the next call sees the new state
            continue
        stamps.append((str(shard.relative_to(records)), stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


def _share_key(share: Any) -> Any:
    """A hashable key of a zero-gradient measurement: its value; a per-sample Series by identity (the analysis
    holds it, so its id names no other object)."""
    if isinstance(share, Mapping):
        return tuple(sorted((str(k), float(v)) for k, v in share.items()))
    return share if share is None or isinstance(share, (int, float)) else ("object", id(share))


def _analyse(run: RunResults, zero_grad_share: float | Mapping[str, float] | None) -> RunAnalysis:
    """A new analysis of ``run`` (what :func:`analyse` keeps)."""
    return RunAnalysis(run, zero_grad_share)


def analyse(run: RunResults, zero_grad_share: float | Mapping[str, float] | None = None) -> RunAnalysis:
    """The analysis of a loaded run, made once per run per process (see the module docstring).
    ``zero_grad_share`` replaces the manifest's measurement of the zero-input-gradient share."""
    key = (id(run), id(run.records), len(run.records), _records_on_disk(run), _share_key(zero_grad_share))
    kept = _CACHE.get(key)
    if kept is not None and kept.run is run:  # the kept analysis holds ``run``, so its id names no other object
        _CACHE.move_to_end(key)
        return kept
    made = _CACHE[key] = _analyse(run, zero_grad_share)
    while len(_CACHE) > CACHED_RUNS:
        _CACHE.popitem(last=False)
    return made

