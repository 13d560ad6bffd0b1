"""The suite's shared words: heads, gate modes, routing gradients, norms, and how eps values are read and written.

Every list a user may choose from lives here once; parsers, configs, attacks and reports import it.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from robustness.core.errors import ConfigError

#: Heads of a coarse/fine model: whose logits an attack sees and whose labels it attacks.
HEADS = ("fine", "coarse")
#: How a gated model runs (DESIGN.md, "Gate modes"). ``hard`` is the deployed forward.
FORWARD_MODES = ("hard", "open", "soft", "random", "frozen")
#: Forward modes an attack evaluation may run in (``soft`` is a relaxation for gradients; ``frozen`` needs a path).
ATTACK_GATE_MODES = ("hard", "open", "random")
#: What an attacker differentiates through the hard gates. ``none`` is the naive evaluation; ``sharp`` is BPDA
#: through ``sigmoid(s / T)`` with a per-gate temperature calibrated on clean inputs (models/surrogates.py).
GRAD_MODES = ("none", "ste", "bpda", "eot", "sharp")
#: The adaptive routing gradients (everything but ``none``).
ROUTING_GRADIENTS = tuple(g for g in GRAD_MODES if g != "none")
#: How hard decisions are carried out: ``subbatch`` runs a block only on its samples, ``mask`` runs and multiplies.
EXECUTIONS = ("subbatch", "mask")
#: Threat models.
NORMS = ("linf", "l2")

_EPS_DENOMINATOR = 255
_EPS_TOLERANCE = 1e-6  # in units of 1/255: only values that *are* k/255 (up to float rounding) print as k/255


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
    """``8/255`` for multiples of 1/255 below 1 (``1.25/255`` for quarters below 16/255), ``inf`` for unbounded,
    ``0`` for none, else a short decimal. With ``norm="linf"`` every budget below 1 is in units of 1/255, the
    run's units (``0.47/255``, ``17.5/255``: a decimal such as ``0.001843`` beside ``0.75/255`` reads as another
    unit); other norms are decimals."""
    eps = float(eps)
    if math.isinf(eps):
        return "inf"
    if eps == 0:
        return "0"
    k = eps * _EPS_DENOMINATOR
    if norm is not None and norm != "linf":
        return f"{eps:.4g}"
    if eps < 1 and round(k) >= 1 and abs(k - round(k)) <= _EPS_TOLERANCE:
        return f"{round(k)}/{_EPS_DENOMINATOR}"
    quarter = abs(4 * k - round(4 * k)) <= 4 * _EPS_TOLERANCE and round(4 * k) > 0
    if quarter and (k < 16 or (norm == "linf" and eps < 1)):  # quarter steps, as --eps auto rounds
        return f"{round(4 * k) / 4:g}/{_EPS_DENOMINATOR}"
    if norm == "linf" and eps < 1:
        return f"{k:.3g}/{_EPS_DENOMINATOR}"
    return f"{eps:.4g}"


def format_distance(value: float, norm: str) -> str:
    """A perturbation size for people: L-inf in units of 1/255 (``1.6/255``; a quarter step such as ``20.75/255``
    exactly, as ``--eps auto`` rounds its budgets), L2 with three significant digits."""
    value = float(value)
    if math.isinf(value):
        return "inf"
    if math.isnan(value):
        return "-"
    if norm == "linf":
        k = value * _EPS_DENOMINATOR
        if 1 <= k < _EPS_DENOMINATOR and abs(4 * k - round(4 * k)) <= 4 * _EPS_TOLERANCE:
            return f"{round(4 * k) / 4:g}/{_EPS_DENOMINATOR}"
        return f"{k:.3g}/{_EPS_DENOMINATOR}"
    return f"{value:.3g}"
