"""``Coarse-head analyses``: not a test but a note, a ``skip`` entry saying which analyses were skipped for records
without a coarse head (a single-head model or data without coarse labels)."""
from __future__ import annotations

import pandas as pd

from robustness.analysis.metrics import SINGLE_HEAD_NOTE, has_coarse_head
from robustness.sanity._registry import Check, CheckInputs, register_check

NAME = "Coarse-head analyses"


def check_heads(df: pd.DataFrame) -> Check | None:
    """A ``skip`` saying that the coarse-head analyses were skipped, for records without a coarse head (a
    single-head model or data without coarse labels); None for two-head records, which need no note."""
    if not len(df) or has_coarse_head(df):
        return None
    return Check(NAME, "skip", SINGLE_HEAD_NOTE[0].upper() + SINGLE_HEAD_NOTE[1:] + ".")


@register_check(NAME, order=100, masking=False)
def _run(inputs: CheckInputs) -> Check | None:
    return check_heads(inputs.df)
