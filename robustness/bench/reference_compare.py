"""The suite's worst case beside the reference PGD (:mod:`robustness.bench.reference`, ``dsn-robust bench
reference``), and the command's result: per eps the reference's robust accuracy, the suite's on the same samples
and the gap between them (:class:`ReferenceResult`, :func:`format_table`).

Pitfalls recorded here:

* The suite's rows are compared on the samples both evaluated (the first ``n`` of the run's attacked samples,
  ``sample < n``), white-box rows only (``source_run == ''``), same gate mode, head and norm (``linf``), attacks that count for
  accuracy (``attacks.records.accuracy_rows``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from attacks.records import accuracy_rows, worst_case
from robustness.bench.reference_records import REFERENCE_ATTACK
from robustness.core.norms import LINF

#: The budgets of a run without attack records at L-inf fixed eps to take its grid from.
DEFAULT_EPS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)


# --------------------------------------------------------------------------------------------------------------
# The suite's worst case on the same samples
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteComparison:
    """The suite's worst case at one eps against the reference, over the samples both evaluated.

    ``gap`` = suite - reference robust accuracy in points (positive: the suite is optimistic). ``suite_optimistic``:
    samples the suite calls robust that the reference fooled; ``reference_optimistic``: the reverse.
    """

    n: int
    robust: int
    accuracy: float
    reference_robust: int
    reference_accuracy: float
    gap: float
    suite_optimistic: int
    reference_optimistic: int
    suite_optimistic_samples: list[int]
    attacks: list[str]


def suite_rows(records: pd.DataFrame, gate_mode: str, head: str, n: int) -> pd.DataFrame:
    """The records that make the suite's worst case comparable with the reference (see the module docstring)."""
    rows = accuracy_rows(records)
    keep = ((rows["source_run"].astype(str) == "") & (rows["gate_mode"].astype(str) == gate_mode)
            & (rows["target"].astype(str) == head) & (rows["norm"].astype(str) == LINF.name)
            & (rows["sample"] < n))
    rows = rows[keep.to_numpy(bool)]
    if "robust" not in rows.columns:  # records from before the column existed
        rows = rows.assign(robust=rows["clean_correct"].astype(bool) & rows["adv_correct"].astype(bool))
    return rows


def run_grid(rows: pd.DataFrame | None) -> tuple[float, ...]:
    """The run's own L-inf fixed-eps grid in :func:`suite_rows` ``rows`` (finite eps > 0; ``--eps auto`` chose
    it, or the user), so the reference checks the budgets the run reports; :data:`DEFAULT_EPS` without rows."""
    if rows is None or rows.empty:
        return DEFAULT_EPS
    eps = np.unique(rows["eps"].to_numpy(float))
    grid = tuple(float(e) for e in eps if np.isfinite(e) and e > 0)
    return grid or DEFAULT_EPS


def compare_with_suite(rows: pd.DataFrame, eps: float, reference_robust: np.ndarray) -> SuiteComparison | None:
    """The suite's per-sample worst case at ``eps`` (min of ``robust`` over its attacks and gradients, minimal-distance
    successes within ``eps`` included) against the
    reference's per-sample ``reference_robust`` [n]; None when the suite has no row at that eps."""
    row_eps = rows["eps"].to_numpy(float)
    here = np.isclose(row_eps, eps, rtol=1e-9, atol=1e-12)
    if not here.any():
        return None
    used = rows[here | np.isinf(row_eps)]
    worst = worst_case(used, by=["norm", "eps", "gate_mode", "target", "source_run"])
    worst = worst[np.isclose(worst["eps"].to_numpy(float), eps, rtol=1e-9, atol=1e-12)]
    per_sample = worst.groupby("sample")["robust"].all()
    samples = per_sample.index.to_numpy(int)
    suite = per_sample.to_numpy(bool)
    ref = np.asarray(reference_robust, bool)[samples]
    n = len(samples)
    acc, ref_acc = 100.0 * float(suite.mean()), 100.0 * float(ref.mean())
    attacks = sorted({f"{a}/{g}" for a, g in zip(used["attack"].astype(str), used["gate_grad"].astype(str))})
    return SuiteComparison(n=n, robust=int(suite.sum()), accuracy=acc, reference_robust=int(ref.sum()),
                           reference_accuracy=ref_acc, gap=acc - ref_acc,
                           suite_optimistic=int((suite & ~ref).sum()), reference_optimistic=int((ref & ~suite).sum()),
                           suite_optimistic_samples=[int(s) for s in samples[suite & ~ref]], attacks=attacks)


# --------------------------------------------------------------------------------------------------------------
# The command's result
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EpsReport:
    eps: float
    eps_label: str
    n: int
    robust: int
    accuracy: float
    by_grad: dict[str, float]
    by_loss: dict[str, float]
    max_linf: float
    unconfirmed: int
    seconds: float
    suite: SuiteComparison | None


@dataclass(frozen=True)
class ReferenceResult:
    run: str
    model: str
    device: str
    n: int
    clean_correct: int
    clean_accuracy: float
    gate_mode: str
    head: str
    steps: int
    restarts: int
    step_factor: float
    grads: list[str]
    losses: list[str]
    seed: int
    temperature: list[float] | None
    has_records: bool
    seconds: float
    eps: list[EpsReport] = field(default_factory=list)
    max_gap: float | None = None
    #: (sample, eps) pairs the reference fooled that the run's worst case had as robust, now joined into its records
    #: as attack ``reference-pgd`` (:mod:`robustness.bench.reference_records`); None: its finds were not recorded
    joined: int | None = None

    @property
    def worst_gap(self) -> float | None:
        """The largest suite - reference gap over the eps the suite ran (None: no comparison)."""
        gaps = [e.suite.gap for e in self.eps if e.suite is not None]
        return max(gaps) if gaps else None

    @property
    def passed(self) -> bool:
        """False when ``max_gap`` is set and the suite is more optimistic than that at some eps."""
        worst = self.worst_gap
        return bool(self.max_gap is None or worst is None or worst <= self.max_gap)

    def to_dict(self) -> dict:
        return dict(asdict(self), worst_gap=self.worst_gap, passed=self.passed)


def format_table(result: ReferenceResult) -> str:
    """Per eps: the reference's robust accuracy (overall, per gradient, per loss) and the suite beside it."""
    def cell(value: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if value is None else fmt.format(value)

    lines = [f"reference L-inf PGD on {result.run} ({result.model}, {result.gate_mode} gates, {result.head} head): "
             f"{result.steps} steps x {result.restarts} restarts, alpha = {result.step_factor} eps / steps, "
             f"first fooling iterate kept; clean {result.clean_correct}/{result.n} ({result.clean_accuracy:.1f}%)"]
    head = f"{'eps':<8}{'reference':>16}" + "".join(f"{g:>8}" for g in result.grads)
    head += "".join(f"{l:>8}" for l in result.losses)
    head += f"  |{'suite':>8}{'gap':>8}{'suite-opt':>11}{'ref-opt':>9}"
    lines.append(head)
    for e in result.eps:
        ref = f"{e.robust}/{e.n} {e.accuracy:5.1f}%"
        row = f"{e.eps_label:<8}{ref:>16}" + "".join(f"{e.by_grad[g]:>8.1f}" for g in result.grads)
        row += "".join(f"{e.by_loss[l]:>8.1f}" for l in result.losses)
        s = e.suite
        row += (f"  |{cell(s and s.accuracy):>8}{cell(s and s.gap, '{:+.1f}'):>8}"
                f"{cell(s and s.suite_optimistic, '{:d}'):>11}{cell(s and s.reference_optimistic, '{:d}'):>9}")
        lines.append(row)
    lines.append("columns: robust accuracy in % (per gradient: all losses; per loss: all gradients); suite = the "
                 "suite's white-box worst case on the same samples, gap = suite - reference in points (positive: "
                 "the suite is optimistic), suite-opt / ref-opt = samples only that side calls robust")
    if not result.has_records:
        lines.append("the run has no attack records: nothing to compare")
    if result.joined is not None:
        lines.append(f"recorded in the run as attack {REFERENCE_ATTACK!r}: {result.joined} (sample, eps) pair(s) it "
                     f"fooled that the run's worst case had as robust are not robust there any more")
    if any(e.unconfirmed for e in result.eps):
        lines.append("note: " + ", ".join(f"{e.eps_label}: {e.unconfirmed}" for e in result.eps if e.unconfirmed)
                     + " fooling iterate(s) not confirmed by the final re-score (counted robust)")
    if result.max_gap is not None:
        verdict = "PASS" if result.passed else "FAIL"
        lines.append(f"{verdict}: largest gap {cell(result.worst_gap, '{:+.1f}')} points, allowed {result.max_gap:g}")
    return "\n".join(lines)
