"""``square-vs-gradient``: the gradient-free attack (Square) does not beat the best gradient attack, paired per
sample; and it was strong enough for that comparison to mean something.

Pitfall: a gradient-free attack far weaker than the gradient attacks cannot reveal masking, so the Square check
says so instead of passing silently. The rules: :func:`check_square_vs_gradient`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from attacks.base import GRADIENT_FREE
from attacks.records import carried
from robustness.core.vocab import format_eps
from robustness.sanity._common import (
    MAX_DETAILS,
    _attack_rows,
    _count,
    _criterion,
    _of_kind,
    _pair,
    _Pair,
    _points,
    _pts,
    _robust_by_sample,
)
from robustness.sanity._registry import Check, CheckInputs, register_check

NAME = "square-vs-gradient"


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
            power=None if carried(s).any() else pair.acc_y <= pair.acc_x + margin + 1e-9))
    return out


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
    name = NAME
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


@register_check(NAME, order=40)
def _run(inputs: CheckInputs) -> Check:
    return check_square_vs_gradient(inputs.df, inputs.margin, alpha=inputs.alpha, min_samples=inputs.min_samples,
                                    queries=inputs.queries)
