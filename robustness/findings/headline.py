"""A run's headline: the handful of numbers a per-model report opens with.

:func:`run_headline` computes them once, as a :class:`RunHeadline`; the report writes ``as_dict()`` into
``summary.json`` (key ``headline``) and renders the HTML and Markdown from the same object, so the page and the
JSON cannot disagree. Every number describes the deployed model (:func:`~robustness.analysis.pivot.headline_scope`:
gate mode ``hard`` for a gated model, else its only mode, on the fine head when it was attacked):

- clean accuracy with a Wilson interval;
- robust accuracy at each finite eps of the run's L-inf fixed-eps grid (L2 when it has no L-inf budgets): the
  per-sample worst case over every accuracy attack, backend and routing gradient (white-box), Wilson interval;
- the median minimal adversarial distance per norm (:mod:`robustness.analysis.distances`, percentile bootstrap),
  or the reason there is none;
- compute saved = 1 - mean clean MACs / all-blocks MACs (not applicable to an ungated model);
- the masking status: the worst status of the gradient-masking checks and the names of those that warn;
- the attacked images: how they were chosen (the manifest's ``subset``: rule, seed, number per fine class), as
  one line (:attr:`SubsetSummary.line`);
- whether the records are complete (:attr:`robustness.results.RunResults.complete`): an interrupted or damaged
  attack leaves numbers over fewer samples or evaluations than the manifest names, and the headline opens with its
  ``INCOMPLETE: ...`` line (:attr:`RunHeadline.incomplete`);
- the samples whose clean or adversarial logits were not finite in some evaluation (the records' ``nonfinite``
  column; 0 for records without it): their predictions, and every number counting them, mean nothing.

Not re-exported by ``robustness.analysis``: it takes ``robustness.sanity`` checks and a loaded
``robustness.results.RunResults``, both of which build on the analysis package.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from robustness.analysis.distances import median_distance, minimal_distances, minimal_rows
from robustness.analysis.metrics import compute_saved, is_gated, worst_case_accuracy
from robustness.analysis.pivot import headline_scope, scoped
from robustness.analysis.stats import Interval, wilson_interval
from robustness.core.vocab import NORMS
from robustness.results import RunResults, Shortfall
from robustness.sanity import Check, worst_status

NAN = float("nan")
NO_GATES = "not applicable: model has no gates"


def _interval_dict(iv: Interval) -> dict[str, float]:
    return {"estimate": iv.estimate, "low": iv.low, "high": iv.high, "n": iv.n}


@dataclass(frozen=True)
class RobustAt:
    """Worst-case robust accuracy at one fixed budget."""

    norm: str
    eps: float
    accuracy: Interval
    attacks: str  # the attacks pooled, comma-separated
    within_budget: str = ""  # minimal-distance attacks whose examples inside this budget count too, comma-separated

    def as_dict(self) -> dict[str, Any]:
        return {"norm": self.norm, "eps": self.eps, **_interval_dict(self.accuracy), "attacks": self.attacks,
                "within_budget": self.within_budget}


@dataclass(frozen=True)
class MedianDistance:
    """The median minimal adversarial distance in one norm over the clean-correct samples, or why there is none."""

    norm: str
    median: Interval | None
    found: int = 0           # clean-correct samples some minimal attack fooled
    clean_correct: int = 0
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        iv = self.median or Interval(NAN, NAN, NAN, 0)
        return {"norm": self.norm, **_interval_dict(iv), "found": self.found, "clean_correct": self.clean_correct,
                "reason": self.reason}


#: classes listed by name in a subset line with uneven counts, before "…"
SUBSET_CLASSES_LISTED = 10
NOT_RECORDED = "subset not recorded (first n test images)"


@dataclass(frozen=True)
class SubsetSummary:
    """How the attacked images were chosen (:mod:`robustness.data.subset`): ``rule`` (``stratified``, ``first``,
    ``given``; None when the run did not record it: an older run, which attacked the first n), ``seed``, ``n`` and
    ``class_counts`` ((fine label, count) pairs, every fine class)."""

    rule: str | None
    seed: int | None
    n: int
    class_counts: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, subset: dict[str, Any], n: int = 0) -> "SubsetSummary":
        """From a manifest's ``subset`` (``RunResults.subset``; {} for an older run, whose size is ``n``)."""
        if not subset or not subset.get("rule"):
            return cls(None, None, int(n or 0))
        counts = tuple(sorted((int(k), int(v)) for k, v in (subset.get("class_counts") or {}).items()))
        indices = subset.get("indices")
        size = len(indices) if isinstance(indices, list) else sum(v for _, v in counts) or int(n or 0)
        seed = subset.get("seed")
        return cls(str(subset["rule"]), None if seed is None else int(seed), size, counts)

    @property
    def line(self) -> str:
        """One line: ``100 test images, stratified by fine class (seed 0): 10 per class``; uneven counts add the
        range and the classes (``…: 9–11 per class (classes 0: 10, 1: 11, …)``)."""
        if self.rule is None:
            return NOT_RECORDED
        images = "image" if self.n == 1 else "images"
        what = {"stratified": f"{self.n} test {images}, stratified by fine class (seed {self.seed})",
                "first": f"the first {self.n} test {images}",
                "given": f"{self.n} {images} as given"}.get(self.rule, f"{self.n} test {images} ({self.rule})")
        if not self.class_counts:
            return what
        values = [v for _, v in self.class_counts]
        low, high = min(values), max(values)
        if low == high:
            return f"{what}: {low} per class"
        present = sum(v > 0 for v in values)
        listed = ", ".join(f"{c}: {v}" for c, v in self.class_counts[:SUBSET_CLASSES_LISTED])
        more = ", …" if len(self.class_counts) > SUBSET_CLASSES_LISTED else ""
        classes = f", {present} of {len(values)} classes present" if present < len(values) else ""
        return f"{what}: {low}–{high} per class{classes} (classes {listed}{more})"

    def as_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "seed": self.seed, "n": self.n,
                "class_counts": {str(c): v for c, v in self.class_counts}, "line": self.line}


@dataclass(frozen=True)
class ModelCheckSummary:
    """An adapted model's check (``models.fidelity``) as the report opens with it: ``value`` / ``detail`` of its
    headline row, and ``warning``, a line for the top of the page when the numbers below need it (a model random
    at test time, or one attacked although its adapter is not faithful), else ''."""

    value: str
    detail: str
    warning: str

    @classmethod
    def of(cls, check: dict[str, Any]) -> "ModelCheckSummary | None":
        if not check:
            return None
        n, draws = int(check.get("n") or 0), int(check.get("draws") or 1)
        faithful = check.get("faithful")
        if faithful is None:
            value, detail = "not checked", str(check.get("note") or "nothing to compare with")
        else:
            value = "faithful" if faithful else "NOT FAITHFUL"
            detail = (f"the adapted deployed forward agrees with the model's own forward on "
                      f"{100 * float(check.get('agreement') or 0):.1f}% of {n} predictions (max logit difference "
                      f"{float(check.get('max_logit_diff') or 0):.3g}, tolerance {float(check.get('tolerance') or 0):g})")
        warning = ""
        if faithful is False:
            warning = f"MODEL NOT FAITHFUL: attacked with --allow-unfaithful; {detail}"
        if check.get("stochastic"):
            random = (f"RANDOM AT TEST TIME: {100 * float(check.get('disagreement') or 0):.1f}% of {n} clean "
                      f"predictions change between {int(check.get('probe_draws') or 0)} forwards of the same images; "
                      f"every prediction here is the majority over {draws} draws, attacked through the mean over "
                      f"them (EOT)")
            warning = f"{warning}. {random}" if warning else random
            detail = f"{detail}; random at test time, majority over {draws} draws"
        return cls(value, detail, warning)

    def as_dict(self) -> dict[str, str]:
        return {"value": self.value, "detail": self.detail, "warning": self.warning}


@dataclass(frozen=True)
class RunHeadline:
    """What a per-model report opens with (see the module docstring)."""

    run: str
    model: str
    gate_mode: str
    target: str
    gated: bool
    clean: Interval
    robust: tuple[RobustAt, ...]
    distances: tuple[MedianDistance, ...]
    compute_saved: float     # NaN when not applicable (see compute_reason)
    compute_reason: str
    masking: str             # pass / warn / skip: the worst check status
    masking_warnings: tuple[str, ...]
    masking_ran: int = 0     # checks that could run (pass or warn), of masking_total
    masking_total: int = 0
    subset: SubsetSummary = SubsetSummary(None, None, 0)  # the attacked images
    complete: bool = True    # every evaluation of the manifest has all its shards and samples (RunResults.complete)
    incomplete: str = ""     # '' when complete, else RunResults.incomplete_line ("INCOMPLETE: ...")
    missing_shards: int = 0  # shards the manifest's evaluations need that are not on disk
    shortfalls: tuple[Shortfall, ...] = ()  # the incomplete evaluations (RunResults.shortfalls)
    nonfinite: int = 0       # samples with non-finite clean or adversarial logits in some evaluation
    model_check: ModelCheckSummary | None = None  # an adapted model's check; None: not checked (a suite model)

    @property
    def subset_line(self) -> str:
        """How the attacked images were chosen, in one line (:attr:`SubsetSummary.line`)."""
        return self.subset.line

    def as_dict(self) -> dict[str, Any]:
        """Plain values for ``summary.json`` (pass through ``core.runtime.jsonable`` for inf/NaN)."""
        return {"run": self.run, "model": self.model, "gate_mode": self.gate_mode, "target": self.target,
                "gated": self.gated, "clean_acc": _interval_dict(self.clean),
                "robust_acc": [r.as_dict() for r in self.robust],
                "median_distance": [d.as_dict() for d in self.distances],
                "compute_saved": None if math.isnan(self.compute_saved) else self.compute_saved,
                "compute_reason": self.compute_reason,
                "masking": {"status": self.masking, "warnings": list(self.masking_warnings),
                            "ran": self.masking_ran, "total": self.masking_total},
                "subset": self.subset.as_dict(), "complete": self.complete, "incomplete": self.incomplete,
                "missing_shards": self.missing_shards, "incomplete_evaluations": [s.as_dict() for s in self.shortfalls],
                "nonfinite": self.nonfinite,
                "model_check": self.model_check.as_dict() if self.model_check else None}


def _clean(rows: pd.DataFrame) -> Interval:
    """Clean accuracy over samples; a sample counts as correct only if every row says so (they agree for a
    deterministic forward)."""
    per_sample = rows.groupby("sample", observed=True)["clean_correct"].all()
    return wilson_interval(int(per_sample.sum()), len(per_sample))


def _robust(records: pd.DataFrame, scope: dict[str, str], worst: pd.DataFrame | None) -> tuple[RobustAt, ...]:
    worst = worst_case_accuracy(records) if worst is None else worst
    if worst.empty:
        return ()
    eps = worst["eps"].to_numpy(float)
    worst = worst[(worst["gate_mode"].astype(str) == scope["gate_mode"]) & (worst["target"].astype(str) ==
                  scope["target"]) & (worst["source_run"].fillna("") == "") & np.isfinite(eps) & (eps > 0)]
    norms = [n for n in NORMS if (worst["norm"] == n).any()]
    if not norms:
        return ()
    grid = worst[worst["norm"] == norms[0]].sort_values("eps")
    return tuple(RobustAt(str(r["norm"]), float(r["eps"]),
                          Interval(float(r["robust_acc"]), float(r["robust_acc_low"]), float(r["robust_acc_high"]),
                                   int(r["n"])), str(r["attacks"]), str(r["within_budget"]))
                 for _, r in grid.iterrows())


def _distances(rows: pd.DataFrame, n_boot: int, seed: int, scope: dict[str, str],
               minimal: pd.DataFrame | None) -> tuple[MedianDistance, ...]:
    norms = [n for n in NORMS if (rows["norm"].astype(str) == n).any()]
    if minimal_rows(rows).empty:
        reason = "no minimal-norm attack in this run (no white-box rows at eps = inf)"
        return tuple(MedianDistance(n, None, reason=reason) for n in norms)
    if minimal is None:
        dist = minimal_distances(rows)
    else:  # the run's distances are per gate mode and head: those of the scope are the scoped rows' own
        in_scope = np.logical_and.reduce([(minimal[k].astype(str) == v).to_numpy(bool) for k, v in scope.items()])
        dist = minimal[in_scope].reset_index(drop=True)
    out = []
    for norm in norms:
        d = dist[dist["norm"].astype(str) == norm]
        if d.empty:
            out.append(MedianDistance(norm, None, reason=f"no minimal-norm attack in {norm} in this run"))
            continue
        correct = d["clean_correct"].to_numpy(bool)
        if not correct.any():
            out.append(MedianDistance(norm, None, reason="no clean-correct sample"))
            continue
        out.append(MedianDistance(norm, median_distance(d, n_boot=n_boot, seed=seed),
                                  found=int((d["found"].to_numpy(bool) & correct).sum()),
                                  clean_correct=int(correct.sum())))
    return tuple(out)


def nonfinite_samples(records: pd.DataFrame) -> int:
    """Samples with ``nonfinite`` True in some row (records without the column: none)."""
    if "nonfinite" not in records.columns or not len(records):
        return 0
    flagged = records["nonfinite"].eq(True).fillna(False).to_numpy(bool)
    return int(records.loc[flagged, "sample"].nunique())


def run_headline(run: RunResults, checks: Sequence[Check], n_boot: int = 1000, seed: int = 0, *,
                 worst_case: pd.DataFrame | None = None, minimal: pd.DataFrame | None = None) -> RunHeadline:
    """The headline of a loaded run (see the module docstring); ``checks`` are the run's ``sanity.run_checks``.
    ``worst_case`` (``metrics.worst_case_accuracy``) and ``minimal`` (``distances.minimal_distances``) of the run's
    records, when the caller has them (:class:`robustness.findings.run.RunAnalysis`), are used instead of computing
    them again."""
    records = run.records
    scope = headline_scope(records) or {"gate_mode": "", "target": ""}
    rows = scoped(records, scope)
    gated = is_gated(records)
    if not gated:
        saved, reason = NAN, NO_GATES
    elif not run.full_macs:
        saved, reason = NAN, "unknown: the attack manifest has no full_macs"
    else:
        saved, reason = compute_saved(rows, run.full_macs), ""
    return RunHeadline(
        run=run.name, model=run.model, gate_mode=scope["gate_mode"], target=scope["target"], gated=gated,
        clean=_clean(rows) if len(rows) else Interval(NAN, NAN, NAN, 0), robust=_robust(records, scope, worst_case),
        distances=_distances(rows, n_boot, seed, scope, minimal), compute_saved=saved, compute_reason=reason,
        masking=worst_status(checks), masking_warnings=tuple(c.name for c in checks if c.status in ("fail", "warn")),
        masking_ran=sum(c.status != "skip" for c in checks), masking_total=len(checks),
        subset=SubsetSummary.of(run.subset, run.n or 0), complete=run.complete, incomplete=run.incomplete_line,
        missing_shards=run.missing_shards, shortfalls=run.shortfalls,
        nonfinite=nonfinite_samples(records), model_check=ModelCheckSummary.of(run.model_check))
