"""Helpers shared by several checks: number formatting, noise tolerance, row selection, verdicts and the paired
(McNemar) comparison of two evaluations of the same samples (the rule: the package docstring, "Noise")."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from attacks.base import attack_kind
from robustness.analysis.selection import accuracy_rows, whitebox
from robustness.sanity._registry import Check

MAX_DETAILS = 20


def _pts(x: float) -> str:
    return f"{100 * x:.1f}%"


def _points(x: float) -> str:
    v = round(100 * x, 1)
    return f"{v:g} point" + ("" if v == 1 else "s")


def _count(k: int, unit: str) -> str:
    return f"{k} {unit}" if k == 1 else f"{k} {unit}s"


def _tolerance(n: int, tol: float) -> float:
    return max(1.0 / n if n else 0.0, tol)


def _accuracy(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Robust accuracy and n per ``keys`` group."""
    return df.groupby(keys, observed=True, dropna=False).agg(acc=("robust", "mean"), n=("robust", "size")).reset_index()


def _attack_rows(df: pd.DataFrame) -> pd.DataFrame:
    """White-box rows of attacks that count for accuracy."""
    return accuracy_rows(whitebox(df))


def _of_kind(rows: pd.DataFrame, kind: str) -> np.ndarray:
    """Per row: whether its attack is registered with ``kind`` (unknown names belong to no kind)."""
    names = rows["attack"].astype(str)
    kinds = {name: attack_kind(name) for name in names.unique()}
    return (names.map(kinds) == kind).to_numpy(bool)


def _verdict(name: str, violations: list[str], total: int, unit: str, warn_text: str, pass_text: str) -> Check:
    if violations:
        return Check(name, "warn", f"{warn_text[0].upper()}{warn_text[1:]} in {len(violations)} of "
                     f"{_count(total, unit)}; e.g. {violations[0]}.",
                     tuple(violations[:MAX_DETAILS]))
    return Check(name, "pass", f"{pass_text} ({_count(total, unit)} checked).")


@dataclass(frozen=True)
class _Pair:
    """Two evaluations compared sample by sample on the samples both ran: ``x`` and ``y``.

    ``only_x`` counts samples robust under ``x`` but not under ``y`` (``y`` broke them and ``x`` did not),
    ``only_y`` the reverse; ``p`` is the exact two-sided McNemar p-value of ``only_x`` vs ``only_y``.
    """

    n: int
    acc_x: float
    acc_y: float
    only_x: int
    only_y: int
    p: float

    def y_stronger(self, alpha: float, min_samples: int, min_points: float) -> bool:
        """``y`` breaks significantly more samples than ``x``: p < ``alpha``, at least ``min_samples`` more and an
        accuracy gap of at least ``min_points``."""
        return (self.p < alpha and self.only_x - self.only_y >= min_samples
                and self.acc_x - self.acc_y >= min_points)

    def x_stronger(self, alpha: float, min_samples: int, min_points: float) -> bool:
        """The mirror image of :meth:`y_stronger`."""
        return (self.p < alpha and self.only_y - self.only_x >= min_samples
                and self.acc_y - self.acc_x >= min_points)

    def counts(self, x: str, y: str) -> str:
        return f"b={self.only_x} robust only under {x}, c={self.only_y} only under {y}, McNemar p={self.p:.2g}"


def _robust_by_sample(rows: pd.DataFrame) -> pd.Series:
    """Per sample: robust under every one of ``rows`` (the per-sample worst case when a sample has several)."""
    return rows.groupby("sample", observed=True)["robust"].min()


def _pair(x: pd.Series, y: pd.Series) -> _Pair | None:
    """The paired comparison of two per-sample ``robust`` Series (indexed by sample); None if no common sample."""
    both = pd.concat([x.rename("x"), y.rename("y")], axis=1, join="inner").dropna()
    if both.empty:
        return None
    bx, by = both["x"].astype(bool).to_numpy(), both["y"].astype(bool).to_numpy()
    only_x, only_y = int((bx & ~by).sum()), int((by & ~bx).sum())
    # scipy's binomtest is the exact McNemar test on the discordant pairs; no discordant pair: no evidence at all
    p = float(binomtest(min(only_x, only_y), only_x + only_y, 0.5).pvalue) if only_x + only_y else 1.0
    return _Pair(len(both), float(bx.mean()), float(by.mean()), only_x, only_y, p)


def _criterion(alpha: float, min_samples: int, min_points: float) -> str:
    return f"McNemar p < {alpha:g}, >= {_count(min_samples, 'sample')} and >= {_points(min_points)}"
