"""Transferability: how often examples crafted on a source run fool a target run, beside the target's own
white-box success rate on the same attack, norm, eps, gate mode and head.

A transfer record is one with ``source_run != ''``; its ``attack`` names the attack run on the source.
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from robustness.analysis.selection import strongest_per_sample, whitebox

TRANSFER_KEYS: list[str] = ["source_run", "run", "attack", "norm", "eps", "gate_mode", "target"]


def transfer_matrix(frames: pd.DataFrame | Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Success rate of transferred examples by (source run -> target run), with white-box success on the diagonal.

    Uses rows with ``source_run != ''``. For each target run and matching (attack, norm, eps, gate_mode, target),
    the run's own white-box success rate (per-sample worst case over backends and routing gradients) is added with
    ``source_run == run`` and ``whitebox=True``.
    Columns: :data:`TRANSFER_KEYS`, ``whitebox``, ``n_clean_correct``, ``n_success``, ``success_rate``.
    """
    df = frames if isinstance(frames, pd.DataFrame) else (
        pd.concat(list(frames), ignore_index=True) if len(frames) else pd.DataFrame())
    cols = TRANSFER_KEYS + ["whitebox", "n_clean_correct", "n_success", "success_rate"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    src = df["source_run"].fillna("")
    transfer = df[src != ""]
    if transfer.empty:
        return pd.DataFrame(columns=cols)
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


