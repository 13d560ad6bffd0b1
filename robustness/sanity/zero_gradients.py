"""``zero-input-gradient``: few samples have an all-zero input gradient (gradient attacks cannot move them). It reads
a measurement that needs the model, not the records: ``run_checks(zero_grad_share=...)``."""
from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from robustness.sanity._common import _pts
from robustness.sanity._registry import Check, CheckInputs, register_check

NAME = "zero-input-gradient"


def check_zero_gradients(zero_grad_share: float | pd.Series | Mapping[str, float] | None,
                         threshold: float = 0.01) -> Check:
    """Few samples have an all-zero input gradient.

    ``zero_grad_share`` is the share itself, a mapping ``"gate_mode/gate_grad" -> share`` (as the attack manifest
    stores it; the worst setting decides), or a per-sample Series of booleans (True = zero gradient) or of
    input-gradient norms (0 counts as zero); None skips the check (computing it needs the model).
    """
    name = NAME
    if zero_grad_share is None or (isinstance(zero_grad_share, Mapping) and not zero_grad_share):
        return Check(name, "skip", "No input-gradient measurement was given (it needs the model).")
    if isinstance(zero_grad_share, Mapping):
        setting, share = max(zero_grad_share.items(), key=lambda kv: float(kv[1]))
        where = f" under {setting}" if len(zero_grad_share) > 1 else ""
        status = "warn" if float(share) > threshold else "pass"
        tail = (": gradient attacks cannot move them, so their robustness is likely masked." if status == "warn"
                else ".")
        return Check(name, status, f"{_pts(float(share))} of samples have an all-zero input gradient{where} "
                     f"({'>' if status == 'warn' else '<='} {_pts(threshold)}){tail}")
    if isinstance(zero_grad_share, pd.Series):
        s = zero_grad_share.dropna()
        if s.empty:
            return Check(name, "skip", "The input-gradient measurement is empty.")
        share = float(s.astype(bool).mean()) if s.dtype == bool else float((s.astype(float) == 0).mean())
    else:
        share = float(zero_grad_share)
    if share > threshold:
        return Check(name, "warn", f"{_pts(share)} of samples have an all-zero input gradient (> {_pts(threshold)}): "
                     "gradient attacks cannot move them, so their robustness is likely masked.")
    return Check(name, "pass", f"{_pts(share)} of samples have an all-zero input gradient "
                 f"(<= {_pts(threshold)}).")


@register_check(NAME, order=60)
def _run(inputs: CheckInputs) -> Check:
    return check_zero_gradients(inputs.zero_grad_share)
