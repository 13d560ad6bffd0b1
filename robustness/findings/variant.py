"""One side of a comparison: a :class:`Variant` is one (run, gate mode) with its white-box records.

:func:`robustness.findings.compare.compare_runs` makes them; the pair guards
(:mod:`robustness.findings.comparability`), the fixed-eps fallback (:mod:`robustness.findings.fixed_eps`) and the
verdict line's text (:mod:`robustness.findings.compare_text`) read them, so the type lives below all four.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import pandas as pd

from robustness.analysis.metrics import compute_saved
from robustness.findings.run import RunAnalysis, analyse
from robustness.analysis.selection import whitebox
from robustness.results import RunResults


@dataclass
class Variant:
    """One (run, gate mode) of a comparison."""

    label: str
    run: RunResults
    gate_mode: str
    records: pd.DataFrame
    skipping: bool

    @property
    def compute_saved(self) -> float:
        """1 - mean clean MACs / full MACs on this variant's white-box records (NaN without full_macs)."""
        return compute_saved(whitebox(self.records), self.run.full_macs)

    @property
    def analysis(self) -> RunAnalysis:
        """The analysis of this variant's run (:func:`robustness.findings.run.analyse`, made once per run)."""
        return analyse(self.run)

    @cached_property
    def minimal(self) -> pd.DataFrame:
        """This variant's minimal distances: its gate mode's of the run's analysis."""
        return self.analysis.minimal_in(gate_mode=self.gate_mode)

    def distances(self, norm: str, target: str) -> pd.DataFrame:
        """Minimal distances in ``norm`` for head ``target`` (minimum over attacks and routing gradients)."""
        d = self.minimal
        return d[(d["norm"] == norm) & (d["target"] == target)]
