"""Gradient-masking checks over attack records.

Which attacks a check compares comes from each attack's registered kind (``attacks.base``): single-step,
iterative, gradient-free, minimal or compute. Compute attacks (``slowdown``) do not count for accuracy; a name the
registry does not know (an older run, a synthetic frame) belongs to no kind and counts for accuracy.

Each check returns a :class:`Check`: ``pass`` when the records look like an honest evaluation, ``warn`` when they
show a symptom of gradient masking (or of a broken attack), ``fail`` when the records cannot be trusted at all (the
model's clean logits are non-finite: ``finite-logits``), ``skip`` when the records lack what the check needs.
The evidence is one sentence with the numbers. :func:`worst_status` orders them fail > warn > pass > skip.

Non-finite logits (the records' ``nonfinite`` column, :mod:`attacks.records`): such rows are never robust, so an
all-NaN model would pass the masking checks with flat curves at 0%. ``finite-logits`` fails on non-finite clean
logits and warns on non-finite adversarial ones, and when more than half of the rows (:data:`NONFINITE_DOMINANT`)
are non-finite every other check is skipped and says why: the records then describe a forward that does not
compute, not an attack.

Robust accuracy is always the mean of the ``robust`` column (clean and adversarial prediction right), never of
``adv_correct``: a sample the model gets wrong on clean input and an attack happens to push to the right class is
not robust, and counting it lets two evaluations differ on samples that no attack needed to break.

Noise: curves of one attack (eps-monotone, iterative-vs-single-step) allow ``max(1 sample, tol)`` (``tol`` = 1
point). Comparisons between two evaluations of the same samples (routing gradients, Square vs gradient attacks)
are *paired*: per sample, ``b`` = robust under the first only, ``c`` = robust under the second only, and a
difference counts only if the exact McNemar test gives p < ``alpha`` (0.05), ``|b - c| >= min_samples`` (3) and
the accuracy gap is at least ``min_points`` (2 points; Square uses ``margin``, 3 points). A fixed margin alone
is not enough: on 64 samples 3 points are 2 samples, which noise produces all the time. Both directions are
reported where both mean something: a routing gradient *weaker* than ``none`` is a poor surrogate, not evidence
that ``none`` is honest. The per-sample worst case over routing gradients (the report's worst case) stays the
number to trust either way.

Pitfalls: only fixed-budget iterative attacks enter the routing comparison (a minimal attack such as CW does
not converge to a comparable budget, and its differences are noise of the search); a gradient-free attack far
weaker than the gradient attacks cannot reveal masking, so the Square check says so instead of passing silently.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from attacks.base import GRADIENT_FREE, ITERATIVE, MINIMAL, SINGLE_STEP, attack_kind
from attacks.records import NONFINITE_PRED
from robustness.analysis.distances import DISTANCE_KEYS, minimal_distances
from robustness.analysis.metrics import SINGLE_HEAD_NOTE, has_coarse_head
from robustness.analysis.selection import accuracy_rows, whitebox
from robustness.analysis.stats import wilson_interval
from robustness.analysis.transfer import transfer_matrix
from robustness.core.vocab import ROUTING_GRADIENTS, format_eps

Status = Literal["pass", "warn", "fail", "skip"]
#: statuses from worst to best (:func:`worst_status`)
SEVERITY: tuple[str, ...] = ("fail", "warn", "pass", "skip")

MAX_DETAILS = 20
#: share of non-finite rows above which the other checks are skipped (:func:`run_checks`)
NONFINITE_DOMINANT = 0.5
FINITE_CHECK = "finite-logits"


@dataclass(frozen=True)
class Check:
    """Outcome of one check: ``status`` is ``pass``, ``warn``, ``fail`` or ``skip``; ``evidence`` is one sentence."""

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
                violations.append(f"{key[1]}/{key[2]}/{key[5]} on {key[0]}: {_pts(a)} at eps={format_eps(eps, key[3])} "
                                  f"vs {_pts(best)} at eps={format_eps(best_eps, key[3])}")
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
    # an iterative attack that ran in the cascade after the single-step one holds its finds: it cannot be weaker
    after = rows[iterative & rows["found_by"].astype(str).isin(_single_step_names(rows)).to_numpy(bool)]
    if not after.empty:
        cascaded = after[keys].drop_duplicates()
        it = it.merge(cascaded, on=keys, how="left", indicator=True)
        it = it[it["_merge"] == "left_only"].drop(columns="_merge")
    cascaded = Check(name, "skip", "The iterative attacks ran in the attack cascade after the single-step one (each "
                     "only on the samples it left robust), so they cannot be weaker; cascade = false compares them.")
    if it.empty:
        return cascaded
    it_best = it.loc[it.groupby(keys, observed=True, dropna=False)["acc"].idxmin()]
    ss_best = ss.loc[ss.groupby(keys, observed=True, dropna=False)["acc"].idxmin()]
    both = it_best.merge(ss_best, on=keys, suffixes=("_it", "_ss"))
    if both.empty:
        return cascaded if not after.empty else Check(name, "skip", "No eps at which both a single-step and an "
                                                      "iterative attack were run.")
    violations = [
        f"{r.attack_it} {_pts(r.acc_it)} vs {r.attack_ss} {_pts(r.acc_ss)} at eps={format_eps(r.eps, r.norm)} "
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


@dataclass(frozen=True)
class _SquareSetting:
    run: str
    attack: str
    label: str
    gradient: str
    pair: _Pair
    masked: bool
    power: bool | None  # None: not measured (Square ran in the cascade after the gradient attacks)

    def line(self) -> str:
        return (f"{self.attack} {_pts(self.pair.acc_y)} vs {self.gradient} {_pts(self.pair.acc_x)} at {self.label} "
                f"({self.pair.counts(self.gradient, self.attack)})")


def _gradient_free_name(rows: pd.DataFrame, run: str, queries: Mapping[str, int] | None) -> str:
    """``square (5000 queries)``: the gradient-free attack(s) run on ``run``, with the budget when it is known."""
    names = "/".join(sorted(rows.loc[rows["run"] == run, "attack"].astype(str).unique()))
    q = (queries or {}).get(run)
    return f"{names} ({q} queries)" if q else names


def _square_settings(sq: pd.DataFrame, grad: pd.DataFrame, margin: float, alpha: float,
                     min_samples: int) -> list[_SquareSetting]:
    """Per (run, norm, eps, gate_mode, target): the gradient-free rows paired with the strongest gradient attack."""
    keys = ["run", "norm", "eps", "gate_mode", "target"]
    config = ["attack", "backend", "gate_grad"]
    by_setting = dict(iter(grad.groupby(keys, observed=True, dropna=False)))
    multi = sq[["run", "norm", "gate_mode", "target"]].drop_duplicates().shape[0] > 1
    out = []
    for key, s in sq.groupby(keys, observed=True, dropna=False):
        g = by_setting.get(key)
        if g is None:
            continue
        best = g.groupby(config, observed=True)["robust"].mean().idxmin()
        g = g[(g[config] == pd.Series(best, index=config)).all(axis=1)]
        pair = _pair(_robust_by_sample(g), _robust_by_sample(s))
        if pair is None:
            continue
        run, norm, eps, gate_mode, target = key
        out.append(_SquareSetting(
            run=str(run), attack="/".join(sorted(s["attack"].astype(str).unique())),
            label=f"eps={format_eps(eps, str(norm))}" + (f" ({run}, {norm}, {gate_mode}, {target})" if multi else ""),
            gradient=f"{best[0]}/{best[2]}", pair=pair, masked=pair.y_stronger(alpha, min_samples, margin),
            # the tolerance keeps e.g. 27% vs 24% + 3 points from failing on float rounding; None: Square ran in the
            # cascade on what the gradient attacks left (rows carried over), so its robust accuracy is theirs or less
            power=None if _carried(s) else pair.acc_y <= pair.acc_x + margin + 1e-9))
    return out


def _carried(rows: pd.DataFrame) -> bool:
    """Whether some of ``rows`` hold another attack's example (the attack cascade carried them over)."""
    return bool((rows["found_by"].astype(str) != rows["attack"].astype(str)).any())


def _single_step_names(rows: pd.DataFrame) -> list[str]:
    return sorted(set(rows.loc[_of_kind(rows, SINGLE_STEP), "attack"].astype(str)))


def check_square_vs_gradient(df: pd.DataFrame, margin: float = 0.03, *, alpha: float = 0.05, min_samples: int = 3,
                             queries: Mapping[str, int] | None = None) -> Check:
    """The gradient-free attack (kind ``gradient-free``: Square) does not beat the best gradient attack; and it was
    strong enough for that comparison to mean something.

    Per setting (run, norm, eps > 0, gate_mode, target) the gradient-free rows are paired per sample with the
    gradient attack (any other kind that counts for accuracy; attack, backend and routing gradient fixed) of the
    lowest robust accuracy. Rules, in order:

    * ``warn`` (masking): in some setting Square breaks significantly more samples than that gradient attack:
      McNemar p < ``alpha``, at least ``min_samples`` more samples and an accuracy gap of at least ``margin``.
    * ``warn`` (too weak): a run in which Square had *power* at no eps. It has power at an eps when its robust
      accuracy is at most ``margin`` above the gradient attack's: only then would it have gone below a masked
      gradient attack. A Square far weaker than the gradient attacks could only reveal masking so severe that it
      leaves them above Square's own accuracy, so its silence proves little; the evidence names its query budget
      (``queries``: run name -> queries, from the attack manifest) and says to raise it.
    * ``pass`` otherwise; the evidence lists the eps at which Square had power (there it could have fired) and
      those at which it was too weak.
    """
    name = "square-vs-gradient"
    rows = _attack_rows(df)
    rows = rows[rows["eps"] > 0]
    gradient_free = _of_kind(rows, GRADIENT_FREE)
    sq, grad = rows[gradient_free], rows[~gradient_free]
    if sq.empty or grad.empty:
        return Check(name, "skip", "Needs both the Square attack and a gradient attack.")
    settings = _square_settings(sq, grad, margin, alpha, min_samples)
    if not settings:
        return Check(name, "skip", "No eps at which both Square and a gradient attack were run on the same samples.")
    attack = {st.run: _gradient_free_name(sq, st.run, queries) for st in settings}
    details = tuple(f"{st.line()}: " + ("Square beats it (masking)" if st.masked else
                    "in the cascade after it" if st.power is None else
                    "power, could have fired" if st.power else "too weak to detect masking")
                    for st in settings)[:MAX_DETAILS]
    masked = [st for st in settings if st.masked]
    if masked:
        st = masked[0]
        return Check(name, "warn", f"Gradient masking suspected: {attack[st.run]} beats every gradient attack by at "
                     f"least {_points(margin)} ({_criterion(alpha, min_samples, margin)}) in {len(masked)} of "
                     f"{_count(len(settings), 'setting')}; e.g. {st.line()}.", details)
    powerless = [run for run in attack if not any(st.power or st.power is None for st in settings if st.run == run)]
    if powerless:
        run = powerless[0]
        st = min((st for st in settings if st.run == run), key=lambda st: st.pair.acc_y - st.pair.acc_x)
        more = f" ({len(powerless)} of {_count(len(attack), 'run')})" if len(attack) > 1 else ""
        text = (f"{attack[run]} was too weak to detect masking{more}: it left {_pts(st.pair.acc_y)} where the gradient "
                f"attacks left {_pts(st.pair.acc_x)} (its closest, at {st.label}); "
                f"raise its queries.")
        return Check(name, "warn", text[0].upper() + text[1:], details)
    power = [st.label for st in settings if st.power]
    weak = [f"{st.label} ({_pts(st.pair.acc_y)} vs {_pts(st.pair.acc_x)})" for st in settings if st.power is False]
    cascaded = [st.label for st in settings if st.power is None]
    names = "/".join(dict.fromkeys(attack.values()))
    text = (f"{names} never beats the best gradient attack significantly ({_count(len(settings), 'setting')} "
            f"checked)"
            + (f"; it had power (robust accuracy within {_points(margin)} of the gradient attacks) at "
               f"{', '.join(power)}, so it could have fired there" if power else "")
            + (f"; at {', '.join(weak)} it was too weak to detect masking" if weak else "")
            + (f"; at {', '.join(cascaded)} it ran in the attack cascade, only on what the gradient attacks left "
               f"robust, so each sample it breaks there is one they missed; its power is not measured (cascade = "
               f"false measures it)" if cascaded else "") + ".")
    return Check(name, "pass", text[0].upper() + text[1:], details)


@dataclass(frozen=True)
class _RoutingSetting:
    label: str
    acc: dict[str, float]
    worst: float
    pairs: dict[str, _Pair]
    stronger: tuple[str, ...]
    weaker: tuple[str, ...]

    @property
    def lowest_acc(self) -> float:
        return min(self.acc.values())

    @property
    def lowest(self) -> str:
        """The gradient of the lowest robust accuracy; ``none/bpda (tied)`` when several share it."""
        tied = [g for g, a in self.acc.items() if a == self.lowest_acc]
        return tied[0] if len(tied) == 1 else f"{'/'.join(tied)} (tied)"

    def describe(self, g: str) -> str:
        p = self.pairs[g]
        return f"none {_pts(p.acc_x)} vs {g} {_pts(p.acc_y)} ({p.counts('none', g)})"

    def line(self) -> str:
        found = [f"{g} stronger than none: {self.describe(g)}" for g in self.stronger] + \
                [f"{g} weaker than none: {self.describe(g)}" for g in self.weaker]
        return (f"{self.label}: {'; '.join(found)}; lowest {self.lowest} {_pts(self.lowest_acc)}, per-sample "
                f"worst case {_pts(self.worst)}")


def _routing_settings(df: pd.DataFrame, alpha: float, min_samples: int, min_points: float) -> list[_RoutingSetting]:
    rows = _attack_rows(df)
    rows = rows[(rows["eps"] > 0) & np.isfinite(rows["eps"])]
    rows = rows[_of_kind(rows, ITERATIVE) & rows["gate_grad"].isin(["none", *ROUTING_GRADIENTS]).to_numpy(bool)]
    keys = ["run", "attack", "backend", "norm", "eps", "gate_mode", "target"]
    out = []
    for (run, attack, backend, norm, eps, gate_mode, target), sub in rows.groupby(keys, observed=True, dropna=False):
        table = sub.groupby(["sample", "gate_grad"], observed=True)["robust"].min().unstack("gate_grad")
        grads = [g for g in ROUTING_GRADIENTS if g in table.columns]
        if "none" not in table.columns or not grads:
            continue
        pairs = {g: p for g in grads if (p := _pair(table["none"], table[g])) is not None}
        if not pairs:
            continue
        used = table[["none", *pairs]].astype(float)
        out.append(_RoutingSetting(
            label=f"{attack} at eps={format_eps(eps, str(norm))} on {run} ({backend}, {norm}, {gate_mode}, {target})",
            acc={g: float(used[g].mean()) for g in used.columns},  # NaN (sample not run) is skipped
            worst=float(used.min(axis=1).mean()),
            pairs=pairs,
            stronger=tuple(g for g, p in pairs.items() if p.y_stronger(alpha, min_samples, min_points)),
            weaker=tuple(g for g, p in pairs.items() if p.x_stronger(alpha, min_samples, min_points))))
    return out


def _names(grads: Iterable[str]) -> str:
    grads = list(dict.fromkeys(grads))
    return f"routing gradient{'s' if len(grads) > 1 else ''} {'/'.join(grads)} {'are' if len(grads) > 1 else 'is'}"


def check_routing_gradients(df: pd.DataFrame, alpha: float = 0.05, min_samples: int = 3,
                            min_points: float = 0.02) -> Check:
    """The hard-gate ``none`` evaluation against each routing gradient (:data:`ROUTING_GRADIENTS`), paired per
    sample, in both directions.

    Settings: white-box rows of fixed-budget iterative attacks (kind ``iterative``; minimal attacks such as CW do
    not converge to a comparable budget) at a finite eps > 0, one per (run, attack, backend, norm, eps, gate_mode,
    target) in which ``none`` and a routing gradient ran. For ``none`` vs gradient ``g`` on their common samples,
    ``b`` counts samples robust under ``none`` but not under ``g``, ``c`` the reverse (exact two-sided McNemar p).
    A difference counts only if p < ``alpha``, ``|b - c| >= min_samples`` and the accuracy gap is at least
    ``min_points``.

    ``warn`` when some ``g`` is significantly *stronger* than ``none`` (the hard-gate evaluation alone is masked)
    or significantly *weaker* (a poor surrogate: its numbers alone would be too optimistic); the evidence says
    which, with accuracies, b, c and p. ``pass`` when neither. Either way it names the gradient of the lowest robust
    accuracy and points to the per-sample worst case over routing gradients (the report's worst case) as the
    number to trust.
    """
    name = "routing-gradient"
    settings = _routing_settings(df, alpha, min_samples, min_points)
    if not settings:
        return Check(name, "skip", f"Needs an iterative attack run with gate_grad 'none' and with a routing gradient "
                     f"({'/'.join(ROUTING_GRADIENTS)}) at the same eps.")
    n = _count(len(settings), "setting")
    if len(settings) == 1:
        s = settings[0]
        lowest = f"{s.lowest} gave the lowest robust accuracy ({_pts(s.lowest_acc)})"
        worst = f"the per-sample worst case over routing gradients ({_pts(s.worst)}; the report's worst case)"
    else:
        tally = pd.Series([s.lowest for s in settings]).value_counts(sort=True)
        lowest = "the lowest robust accuracy came from " + ", ".join(f"{g} in {_count(int(k), 'setting')}"
                                                                        for g, k in tally.items())
        w = [s.worst for s in settings]
        worst = (f"the per-sample worst case over routing gradients ({_pts(min(w))} to {_pts(max(w))} across "
                 f"settings; the report's worst case)")
    tail = f"{lowest}; {worst} is the number to trust"
    stronger = [s for s in settings if s.stronger]
    weaker = [s for s in settings if s.weaker]
    if not stronger and not weaker:
        grads = "/".join(dict.fromkeys(g for s in settings for g in s.pairs))
        return Check(name, "pass", f"No routing gradient ({grads}) differs significantly from 'none' "
                     f"({_criterion(alpha, min_samples, min_points)}) in {n} checked; {tail}.")
    parts = []
    if stronger:
        s = stronger[0]
        parts.append(f"{_names(g for t in stronger for g in t.stronger)} significantly stronger than 'none' in "
                     f"{len(stronger)} of {n}, so the hard-gate ('none') evaluation alone is masked there (e.g. "
                     f"{s.label}: {s.describe(s.stronger[0])})")
    if weaker:
        s = weaker[0]
        parts.append(f"{_names(g for t in weaker for g in t.weaker)} significantly weaker than 'none' in "
                     f"{len(weaker)} of {n}: a poor surrogate gradient, whose numbers alone would be too optimistic "
                     f"(e.g. {s.label}: {s.describe(s.weaker[0])})")
    text = "; ".join([*parts, tail])
    details = tuple(s.line() for s in settings if s.stronger or s.weaker)[:MAX_DETAILS]
    return Check(name, "warn", text[0].upper() + text[1:] + ".", details)


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
    violations = [f"{r.attack} {r.source_run}->{r.run} at eps={format_eps(r.eps, r.norm)}: "
                  f"transfer {_pts(r.success_rate_tr)} vs white-box {_pts(r.success_rate_wb)}"
                  for r in both.itertuples()
                  if r.success_rate_tr > r.success_rate_wb + _tolerance(int(r.n_clean_correct_wb), tol)]
    if violations:
        return Check(name, "warn", f"Transfer beats white-box in {len(violations)} of "
                     f"{_count(len(both), 'setting')} "
                     f"(e.g. {violations[0]}): the white-box attack is not finding the target's real weak spots.",
                     tuple(violations[:MAX_DETAILS]))
    return Check(name, "pass", f"Transfer never beats the white-box attack ({_count(len(both), 'setting')} checked).")


def check_curve_vs_fixed(df: pd.DataFrame) -> Check:
    """The fixed-eps attacks' per-sample worst case lies inside the robustness curve's 95% band at every budget.

    The curve (from the minimal distances) and the fixed-eps attacks are independent searches for the same
    thing. Fixed-eps robust accuracy above the band: the minimal search found examples within the budget that the
    fixed-eps attacks missed (the fixed-eps numbers overstate robustness). Below it: the minimal search stopped
    short there (its distances overstate robustness)."""
    name = "curve-vs-fixed-eps"
    dist = minimal_distances(df)
    rows = _attack_rows(df)
    fixed = rows[(rows["attack"].astype(str).map(lambda a: attack_kind(a) != MINIMAL).to_numpy(bool))
                 & np.isfinite(rows["eps"]) & (rows["eps"] > 0)]
    if dist.empty or fixed.empty:
        return Check(name, "skip", "Needs both minimal-distance records (eps=inf) and fixed-eps attacks.")
    keys = [k for k in DISTANCE_KEYS if k != "model"]
    robust = fixed.groupby([*keys, "eps", "sample"], observed=True)["robust"].all().reset_index()
    above, below, checked = [], [], 0
    for key, g in robust.groupby([*keys, "eps"], observed=True):
        d = dist[np.logical_and.reduce([dist[k] == v for k, v in zip(keys, key[:-1])])]
        d = d[d["sample"].isin(g["sample"])]
        if d.empty:
            continue
        eps, checked = float(key[-1]), checked + 1
        band = wilson_interval(int((d["distance"].to_numpy(float) > eps).sum()), len(d))
        acc = float(g["robust"].mean())
        where = (f"{key[0]} ({key[1]}, {key[3]}) eps={format_eps(eps, key[3])}: fixed-eps {_pts(acc)} vs curve "
                 f"{_pts(band.estimate)} [{_pts(band.low)}, {_pts(band.high)}]")
        if acc > band.high:
            above.append(where)
        elif acc < band.low:
            below.append(where)
    if not checked:
        return Check(name, "skip", "No budget where both the curve and a fixed-eps attack have the same samples.")
    if above or below:
        parts = ([f"{len(above)} above the curve's band (the fixed-eps attacks missed examples the minimal search "
                  f"found; e.g. {above[0]})"] if above else []) + \
                ([f"{len(below)} below it (the minimal search stopped short; e.g. {below[0]})"] if below else [])
        return Check(name, "warn", f"Of {_count(checked, 'budget')}, fixed-eps robust accuracy lies "
                     + " and ".join(parts) + ".", tuple((above + below)[:MAX_DETAILS]))
    return Check(name, "pass", f"At {_count(checked, 'budget')} the fixed-eps worst case lies inside the "
                 "robustness curve's 95% band.")


def _head_column(df: pd.DataFrame, side: str) -> np.ndarray:
    """Per row: the ``side`` (``clean`` / ``adv``) prediction of the row's attacked head."""
    fine = df[f"{side}_pred_fine"].to_numpy(np.int64)
    coarse = df[f"{side}_pred_coarse"].to_numpy(np.int64)
    return np.where(df["target"].astype(str).to_numpy(object) == "coarse", coarse, fine)


def nonfinite_share(df: pd.DataFrame) -> float:
    """Share of rows whose logits were non-finite (0 for an empty frame or records without the column)."""
    if not len(df) or "nonfinite" not in df.columns:
        return 0.0
    return float(df["nonfinite"].to_numpy(bool).mean())


def check_finite_logits(df: pd.DataFrame) -> Check:
    """The model's logits are finite on clean and on adversarial inputs (the records' ``nonfinite`` column).

    ``fail`` when any clean logit of the attacked head is non-finite (NaN or inf; ``clean_pred_<target>`` is
    :data:`attacks.records.NONFINITE_PRED`): those samples are counted wrong, and every accuracy of the run measures
    a forward that does not compute. ``warn`` when only adversarial logits are non-finite: those rows count as not
    robust and not as successful attacks, and the robust accuracy reflects inputs on which the model breaks down
    numerically, not adversarial examples. ``pass`` otherwise; ``skip`` without records."""
    name = FINITE_CHECK
    if not len(df):
        return Check(name, "skip", "No records to check.")
    bad = df["nonfinite"].to_numpy(bool) if "nonfinite" in df.columns else np.zeros(len(df), bool)
    clean_bad = bad & (_head_column(df, "clean") == NONFINITE_PRED)
    adv_bad = bad & ~clean_bad
    samples = df[["run", "sample"]].drop_duplicates()
    if not bad.any():
        return Check(name, "pass", f"Every clean and adversarial logit is finite ({_count(len(df), 'row')} of "
                     f"{_count(len(samples), 'sample')} checked).")
    keys = ["run", "attack", "backend", "norm", "gate_mode", "gate_grad", "target", "eps"]
    per = (df.assign(n_clean_bad=clean_bad, n_adv_bad=adv_bad).groupby(keys, observed=True, dropna=False)
           [["n_clean_bad", "n_adv_bad"]].sum().reset_index())
    per = per[(per["n_clean_bad"] > 0) | (per["n_adv_bad"] > 0)]
    per = per.sort_values(["n_adv_bad", "n_clean_bad"], ascending=False, kind="stable")
    details = tuple(f"{r.attack}/{r.backend}/{r.gate_grad} ({r.gate_mode}, {r.target}) at eps={format_eps(r.eps, r.norm)} on "
                    f"{r.run}: {int(r.n_clean_bad)} clean, {int(r.n_adv_bad)} adversarial"
                    for r in per.itertuples())[:MAX_DETAILS]
    adv_rows = int(adv_bad.sum())
    adv_samples = len(df.loc[adv_bad, ["run", "sample"]].drop_duplicates())
    if clean_bad.any():
        broken = len(df.loc[clean_bad, ["run", "sample"]].drop_duplicates())
        runs = sorted(df.loc[clean_bad, "run"].astype(str).unique())
        more = (f"; adversarial logits are non-finite in {adv_rows} more rows ({_count(adv_samples, 'sample')})"
                if adv_rows else "")
        return Check(name, "fail", f"The clean logits are non-finite (NaN or inf) for {broken} of "
                     f"{_count(len(samples), 'sample')} (in {', '.join(map(repr, runs))}){more}: those samples count as wrong "
                     f"and never robust, so the clean and robust accuracies measure a forward that does not compute, "
                     f"not robustness; fix the model before reading any number.", details)
    top = per.iloc[0]
    attacked = _count(int((df["eps"] > 0).sum()), "attacked row")
    return Check(name, "warn", f"The clean logits are finite, but the adversarial logits are non-finite (NaN or inf) "
                 f"in {adv_rows} of {attacked} ({adv_samples} of {_count(len(samples), 'sample')}; most in "
                 f"{top.attack}/{top.gate_grad} at eps={format_eps(top.eps, top.norm)}: {int(top.n_adv_bad)}): those rows count "
                 f"as not robust and not as successful attacks; the model breaks down numerically inside the budget, "
                 f"so its robust accuracy there reflects that, not adversarial examples.", details)


def _skipped(check: Check, share: float) -> Check:
    """``check`` replaced by a skip saying that non-finite rows dominate the records."""
    return Check(check.name, "skip", f"Not checked: {_pts(share)} of the rows have non-finite logits (more than "
                 f"{_pts(NONFINITE_DOMINANT)}; see {FINITE_CHECK}), so these records describe a forward that does not "
                 f"compute, not an attack.")


def check_heads(df: pd.DataFrame) -> Check | None:
    """A ``skip`` saying that the coarse-head analyses were skipped, for records without a coarse head (a
    single-head model or data without coarse labels); None for two-head records, which need no note."""
    if not len(df) or has_coarse_head(df):
        return None
    return Check("Coarse-head analyses", "skip", SINGLE_HEAD_NOTE[0].upper() + SINGLE_HEAD_NOTE[1:] + ".")


def run_checks(df: pd.DataFrame, *, zero_grad_share: float | pd.Series | Mapping[str, float] | None = None,
               tol: float = 0.01, margin: float = 0.03, unbounded_threshold: float = 0.05, alpha: float = 0.05,
               min_samples: int = 3, min_points: float = 0.02,
               queries: Mapping[str, int] | None = None) -> list[Check]:
    """All checks on ``df``, in a fixed order. ``margin`` is the Square check's gap and power margin; ``alpha``,
    ``min_samples`` and ``min_points`` decide when a paired difference counts; ``queries`` is the gradient-free
    attack's query budget per run name (from the attack manifest). Records without a coarse head get one more
    (``skip``) entry saying which analyses were skipped (:func:`check_heads`). The finite-logits check
    (:func:`check_finite_logits`) comes after the masking checks; when more than :data:`NONFINITE_DOMINANT` of the
    rows are non-finite, the masking checks are replaced by skips that say so."""
    heads = check_heads(df)
    masking = [
        check_eps_monotone(df, tol),
        check_iterative_vs_single_step(df, tol),
        check_unbounded(df, unbounded_threshold),
        check_square_vs_gradient(df, margin, alpha=alpha, min_samples=min_samples, queries=queries),
        check_routing_gradients(df, alpha, min_samples, min_points),
        check_zero_gradients(zero_grad_share),
        check_transfer_vs_whitebox(df, tol),
        check_curve_vs_fixed(df),
    ]
    share = nonfinite_share(df)
    if share > NONFINITE_DOMINANT:
        masking = [_skipped(c, share) for c in masking]
    return [*masking, check_finite_logits(df), *([heads] if heads is not None else [])]


def worst_status(checks: Iterable[Check]) -> Status:
    """The worst status of ``checks`` in the order fail > warn > pass > skip (``skip`` when there is none)."""
    statuses = {c.status for c in checks}
    return next((s for s in SEVERITY if s in statuses and s != "skip"), "skip")  # type: ignore[return-value]
