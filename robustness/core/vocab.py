"""The suite's shared words: heads, gate modes, norms, and how eps values are read and written.

Every fixed list a user may choose from lives here once; parsers, configs, attacks and reports import it. The
norms are objects (:mod:`robustness.core.norms`, which owns how each writes its budgets and distances); the routing
gradients are a registry above this layer (``models.routing.GRAD_MODES``), since a plug-in may add one.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from robustness.core.errors import ConfigError
from robustness.core.norms import EPS_UNIT, NORM_NAMES, is_norm, norm_for, quarter_levels, whole_levels

#: Heads of a coarse/fine model: whose logits an attack sees and whose labels it attacks.
HEADS = ("fine", "coarse")
#: How a gated model runs (DESIGN.md, "Gate modes"). ``hard`` is the deployed forward.
FORWARD_MODES = ("hard", "open", "soft", "random", "frozen")
#: Forward modes an attack evaluation may run in (``soft`` is a relaxation for gradients; ``frozen`` needs a path).
ATTACK_GATE_MODES = ("hard", "open", "random")
#: How hard decisions are carried out: ``subbatch`` runs a block only on its samples, ``mask`` runs and multiplies.
EXECUTIONS = ("subbatch", "mask")
#: Threat models (:func:`robustness.core.norms.norm_for` gives each one's object).
NORMS = NORM_NAMES


def parse_eps(value: Any) -> float:
    """An eps from a number or a string such as ``"8/255"``, ``"0.03"`` or ``"inf"``."""
    if isinstance(value, bool):
        raise ConfigError(f"eps must be a number, got {value!r}")
    try:
        eps = _read_eps(value)
    except (ValueError, TypeError, ZeroDivisionError, OverflowError):  # Fraction -> float overflows past 1e308
        eps = math.nan
    if math.isnan(eps):
        raise ConfigError(f"cannot read eps {_short(value)}; write e.g. 8/255 or 0.03")
    return eps


def _read_eps(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    if text.lower() in ("inf", "infinity"):
        return math.inf
    if "/" in text:
        num, den = text.split("/", 1)
        return float(Fraction(num.strip()) / Fraction(den.strip()))
    eps = float(text)
    if math.isinf(eps) and "inf" not in text.lower():
        raise OverflowError(text)  # "1e400": a finite number too large for a float, not the word inf
    return eps


def _short(value: Any, limit: int = 40) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error line stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def format_eps(eps: float, norm: str | None = None) -> str:
    """A budget for people. With a norm, in that norm's units (:meth:`robustness.core.norms.Norm.format_eps`:
    L-inf below 1 always in 1/255, ``0.47/255``, ``17.5/255``; L2 a short decimal). Without one: ``8/255`` for
    multiples of 1/255 below 1 (``1.25/255`` for quarters below 16/255), ``inf`` for unbounded, ``0`` for none,
    else a short decimal, never a guess at the unit. A norm this version does not know prints as a decimal."""
    eps = float(eps)
    if math.isinf(eps):
        return "inf"
    if eps == 0:
        return "0"
    if norm is not None:
        return norm_for(norm).format_eps(eps) if is_norm(norm) else f"{eps:.4g}"
    k = eps * EPS_UNIT
    whole, quarter = whole_levels(k), quarter_levels(k)
    if eps < 1 and whole is not None:
        return f"{whole}/{EPS_UNIT}"
    if quarter is not None and k < 16:  # quarter steps, as --eps auto rounds
        return f"{quarter:g}/{EPS_UNIT}"
    return f"{eps:.4g}"


def format_distance(value: float, norm: str) -> str:
    """A perturbation size for people, in ``norm``'s units (:meth:`robustness.core.norms.Norm.format_distance`:
    L-inf in units of 1/255, ``1.6/255``, a quarter step such as ``20.75/255`` exactly, as ``--eps auto`` rounds its
    budgets; L2 with three significant digits; a norm this version does not know as L2)."""
    value = float(value)
    if is_norm(norm):
        return norm_for(norm).format_distance(value)
    if math.isinf(value):
        return "inf"
    return "-" if math.isnan(value) else f"{value:.3g}"
