"""Gradient-masking checks over attack records.

Which attacks a check compares comes from each attack's registered kind (``attacks.base``): single-step,
iterative, gradient-free, minimal or compute. Compute attacks (``slowdown``) do not count for accuracy; a name the
registry does not know (an older run, a synthetic frame) belongs to no kind and counts for accuracy.

Each check returns a :class:`Check`: ``pass`` when the records look like an honest evaluation, ``warn`` when they
show a symptom of gradient masking (or of a broken attack), ``skip`` when the records lack what the check needs.
The evidence is one sentence with the numbers. Accuracies are compared with a noise tolerance of
``max(1 sample, tol)`` (``tol`` = 1 point by default) and gaps between attacks with ``margin`` (3 points).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from attacks.base import GRADIENT_FREE, ITERATIVE, SINGLE_STEP, attack_kind
from robustness.analysis.selection import accuracy_rows, whitebox
from robustness.analysis.transfer import transfer_matrix
from robustness.core.vocab import ROUTING_GRADIENTS, format_eps

Status = Literal["pass", "warn", "skip"]

MAX_DETAILS = 20


@dataclass(frozen=True)
class Check:
    """Outcome of one check: ``status`` is ``pass``, ``warn`` or ``skip``; ``evidence`` is one sentence."""

    name: str
    status: Status
    evidence: str
    details: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form: name, status, evidence, details."""
        return {"name": self.name, "status": self.status, "evidence": self.evidence, "details": list(self.details)}


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
    return df.groupby(keys, observed=True, dropna=False).agg(acc=("adv_correct", "mean"), n=("adv_correct", "size")) \
        .reset_index()


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


def check_eps_monotone(df: pd.DataFrame, tol: float = 0.01) -> Check:
    """Robust accuracy does not rise with eps (beyond noise) along any attack's curve."""
    name = "eps-monotone"
    curve_keys = ["run", "attack", "backend", "norm", "gate_mode", "gate_grad", "target", "source_run"]
    acc = _accuracy(df, curve_keys + ["eps"]) if len(df) else pd.DataFrame()
    violations, total = [], 0
    for key, g in (acc.groupby(curve_keys, observed=True, dropna=False) if len(acc) else []):
        g = g.sort_values("eps")
        if len(g) < 2:
            continue
        total += 1
        best, best_eps = np.inf, None
        for eps, a, n in zip(g["eps"], g["acc"], g["n"]):
            if best_eps is not None and a > best + _tolerance(int(n), tol):
                violations.append(f"{key[1]}/{key[2]}/{key[5]} on {key[0]}: {_pts(a)} at eps={format_eps(eps)} vs "
                                  f"{_pts(best)} at eps={format_eps(best_eps)}")
                break
            if a < best:
                best, best_eps = a, eps
    if total == 0:
        return Check(name, "skip", "No attack was run at two or more eps values.")
    return _verdict(name, violations, total, "curve", "robust accuracy rises with eps",
                    f"Robust accuracy never rises with eps by more than max(1 sample, {_points(tol)})")


def check_iterative_vs_single_step(df: pd.DataFrame, tol: float = 0.01) -> Check:
    """Iterative attacks (PGD, APGD, ...) are at least as strong as single-step ones (FGSM) at each eps."""
    name = "iterative-vs-single-step"
    rows = _attack_rows(df)
    rows = rows[rows["eps"] > 0]
    keys = ["run", "norm", "eps", "gate_mode", "gate_grad", "target"]
    iterative = _of_kind(rows, ITERATIVE)
    it = _accuracy(rows[iterative], keys + ["attack"]) if iterative.any() else None
    ss = _accuracy(rows[_of_kind(rows, SINGLE_STEP)], keys + ["attack"])
    if it is None or ss.empty:
        return Check(name, "skip", "Needs both a single-step (fgsm) and an iterative (pgd/apgd) attack.")
    it_best = it.loc[it.groupby(keys, observed=True, dropna=False)["acc"].idxmin()]
    ss_best = ss.loc[ss.groupby(keys, observed=True, dropna=False)["acc"].idxmin()]
    both = it_best.merge(ss_best, on=keys, suffixes=("_it", "_ss"))
    if both.empty:
        return Check(name, "skip", "No eps at which both a single-step and an iterative attack were run.")
    violations = [
        f"{r.attack_it} {_pts(r.acc_it)} vs {r.attack_ss} {_pts(r.acc_ss)} at eps={format_eps(r.eps)} "
        f"({r.run}, {r.gate_grad})"
        for r in both.itertuples()
        if r.acc_it > r.acc_ss + _tolerance(int(min(r.n_it, r.n_ss)), tol)]
    return _verdict(name, violations, len(both), "setting", "the iterative attack is weaker than FGSM",
                    "The best iterative attack is at least as strong as FGSM at every eps")


def check_unbounded(df: pd.DataFrame, threshold: float = 0.05, proxy_eps: float = 0.3) -> Check:
    """An unbounded attack (eps = inf, or a linf eps >= ``proxy_eps`` as a proxy) drives accuracy below
    ``threshold``."""
    name = "unbounded-attack"
    rows = _attack_rows(df)
    unbounded = rows[np.isinf(rows["eps"])]
    how = "eps=inf"
    if unbounded.empty:
        linf = rows[(rows["norm"] == "linf") & np.isfinite(rows["eps"])]
        if linf.empty or linf["eps"].max() < proxy_eps:
            return Check(name, "skip", f"No unbounded attack (eps=inf) and no linf eps >= {proxy_eps} was run.")
        unbounded = linf[linf["eps"] == linf["eps"].max()]
        how = f"linf eps={format_eps(float(unbounded['eps'].iloc[0]))} (proxy for unbounded)"
    keys = ["run", "norm", "eps", "gate_mode", "target"]
    acc = _accuracy(unbounded, keys + ["attack", "backend", "gate_grad"])
    best = acc.loc[acc.groupby(keys, observed=True, dropna=False)["acc"].idxmin()]
    violations = [f"best attack {r.attack}/{r.gate_grad} leaves {_pts(r.acc)} accuracy on {r.run} ({r.gate_mode})"
                  for r in best.itertuples() if r.acc >= threshold]
    return _verdict(name, violations, len(best), "setting",
                    f"an unbounded attack ({how}) leaves accuracy >= {_pts(threshold)}",
                    f"An unbounded attack ({how}) drives accuracy below {_pts(threshold)}, worst "
                    f"{_pts(float(best['acc'].max()))}")


def check_square_vs_gradient(df: pd.DataFrame, margin: float = 0.03) -> Check:
    """The gradient-free Square attack does not beat the best gradient attack by more than ``margin``."""
    name = "square-vs-gradient"
    rows = _attack_rows(df)
    rows = rows[rows["eps"] > 0]
    keys = ["run", "norm", "eps", "gate_mode", "target"]
    gradient_free = _of_kind(rows, GRADIENT_FREE)
    sq = rows[gradient_free]
    grad = rows[~gradient_free]
    if sq.empty or grad.empty:
        return Check(name, "skip", "Needs both the Square attack and a gradient attack.")
    sq_acc = _accuracy(sq, keys).rename(columns={"acc": "acc_sq"})
    g_acc = _accuracy(grad, keys + ["attack", "gate_grad"])
    g_best = g_acc.loc[g_acc.groupby(keys, observed=True, dropna=False)["acc"].idxmin()]
    both = sq_acc.merge(g_best, on=keys)
    if both.empty:
        return Check(name, "skip", "No eps at which both Square and a gradient attack were run.")
    violations = [f"square {_pts(r.acc_sq)} vs {r.attack}/{r.gate_grad} {_pts(r.acc)} at eps={format_eps(r.eps)} "
                  f"({r.run}, {r.gate_mode})" for r in both.itertuples() if r.acc_sq < r.acc - margin]
    if violations:
        return Check(name, "warn", f"Gradient masking suspected: the gradient-free Square attack beats every "
                     f"gradient attack by more than {_points(margin)} in {len(violations)} of "
                     f"{_count(len(both), 'setting')}; e.g. {violations[0]}.", tuple(violations[:MAX_DETAILS]))
    return Check(name, "pass", f"Square never beats the best gradient attack by more than {_points(margin)} "
                 f"({_count(len(both), 'setting')} checked).")


def check_routing_gradients(df: pd.DataFrame, margin: float = 0.03) -> Check:
    """Routing gradients (ste/bpda/eot) do not beat the hard-gate ``none`` evaluation by more than ``margin``."""
    name = "routing-gradient"
    rows = _attack_rows(df)
    rows = rows[rows["eps"] > 0]
    keys = ["run", "attack", "backend", "norm", "eps", "gate_mode", "target"]
    none = _accuracy(rows[rows["gate_grad"] == "none"], keys)
    routed = _accuracy(rows[rows["gate_grad"].isin(list(ROUTING_GRADIENTS))], keys + ["gate_grad"])
    if none.empty or routed.empty:
        return Check(name, "skip", "Needs the same attack run with gate_grad 'none' and with 'ste'/'bpda'/'eot'.")
    best = routed.loc[routed.groupby(keys, observed=True, dropna=False)["acc"].idxmin()]
    both = none.merge(best, on=keys, suffixes=("_none", "_routed"))
    if both.empty:
        return Check(name, "skip", "No attack was run both with gate_grad 'none' and with a routing gradient.")
    violations = [f"{r.attack} at eps={format_eps(r.eps)} on {r.run}: none {_pts(r.acc_none)} vs {r.gate_grad} "
                  f"{_pts(r.acc_routed)}" for r in both.itertuples() if r.acc_none - r.acc_routed > margin]
    if violations:
        return Check(name, "warn", f"The hard-gate ('none') evaluation was masked: routing gradients lower "
                     f"accuracy by more than {_points(margin)} in {len(violations)} of "
                     f"{_count(len(both), 'setting')} (e.g. {violations[0]}); trust the BPDA/STE numbers.",
                     tuple(violations[:MAX_DETAILS]))
    return Check(name, "pass", f"Routing gradients (ste/bpda/eot) never beat 'none' by more than {_points(margin)} "
                 f"({_count(len(both), 'setting')} checked).")


def check_zero_gradients(zero_grad_share: float | pd.Series | Mapping[str, float] | None,
                         threshold: float = 0.01) -> Check:
    """Few samples have an all-zero input gradient.

    ``zero_grad_share`` is the share itself, a mapping ``"gate_mode/gate_grad" -> share`` (as the attack manifest
    stores it; the worst setting decides), or a per-sample Series of booleans (True = zero gradient) or of
    input-gradient norms (0 counts as zero); None skips the check (computing it needs the model).
    """
    name = "zero-input-gradient"
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


def check_transfer_vs_whitebox(df: pd.DataFrame, tol: float = 0.01) -> Check:
    """Transferred examples do not succeed more often than white-box ones on the same target at the same eps."""
    name = "transfer-vs-whitebox"
    if df.empty or (df["source_run"].fillna("") == "").all():
        return Check(name, "skip", "No transfer records (source_run != '').")
    tm = transfer_matrix(df)
    keys = ["run", "attack", "norm", "eps", "gate_mode", "target"]
    tr, wb = tm[~tm["whitebox"]], tm[tm["whitebox"]]
    both = tr.merge(wb[keys + ["success_rate", "n_clean_correct"]], on=keys, suffixes=("_tr", "_wb"))
    if both.empty:
        return Check(name, "skip", "No white-box run of the transferred attack on the target at the same eps.")
    violations = [f"{r.attack} {r.source_run}->{r.run} at eps={format_eps(r.eps)}: "
                  f"transfer {_pts(r.success_rate_tr)} vs white-box {_pts(r.success_rate_wb)}"
                  for r in both.itertuples()
                  if r.success_rate_tr > r.success_rate_wb + _tolerance(int(r.n_clean_correct_wb), tol)]
    if violations:
        return Check(name, "warn", f"Transfer beats white-box in {len(violations)} of "
                     f"{_count(len(both), 'setting')} "
                     f"(e.g. {violations[0]}): the white-box attack is not finding the target's real weak spots.",
                     tuple(violations[:MAX_DETAILS]))
    return Check(name, "pass", f"Transfer never beats the white-box attack ({_count(len(both), 'setting')} checked).")


def run_checks(df: pd.DataFrame, *, zero_grad_share: float | pd.Series | Mapping[str, float] | None = None,
               tol: float = 0.01, margin: float = 0.03, unbounded_threshold: float = 0.05) -> list[Check]:
    """All checks on ``df``, in a fixed order."""
    return [
        check_eps_monotone(df, tol),
        check_iterative_vs_single_step(df, tol),
        check_unbounded(df, unbounded_threshold),
        check_square_vs_gradient(df, margin),
        check_routing_gradients(df, margin),
        check_zero_gradients(zero_grad_share),
        check_transfer_vs_whitebox(df, tol),
    ]


def worst_status(checks: Iterable[Check]) -> Status:
    """``warn`` if any check warns, else ``pass`` if any passed, else ``skip``."""
    statuses = {c.status for c in checks}
    return "warn" if "warn" in statuses else "pass" if "pass" in statuses else "skip"
