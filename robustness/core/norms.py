"""The threat models: one :class:`Norm` object per norm (``linf``, ``l2``), looked up by name with :func:`norm_for`.

A norm owns everything that differs between threat models: the per-sample distance of a perturbation, its
projection onto the eps-ball, the steepest-ascent direction of a gradient, a random start inside the ball, the
rounding tolerance of the budget check, which budgets a config may ask for, the rounding of a budget people type,
how a budget or a distance is written in the run's units (L-inf in units of 1/255 of the pixel range, L2 as a plain
decimal) and how reports name it (:func:`title_of`). Keeping an image
in [0, 1] is no norm's business: :meth:`Norm.project` moves a perturbation into the ball only, and the attack
clips the image after it (:func:`attacks.backends.native.project`); only :meth:`Norm.random_start`, which returns
an image, clips.

:func:`per_sample` is the one broadcast of per-sample values ([B]) over a batch of images ([B, C, H, W]).

Tensors come in as torch tensors, but torch is imported inside the methods: the CLI's cheap answers import this
module (through :mod:`robustness.core.vocab`) and must not load torch.
"""
from __future__ import annotations

import math
from typing import Any

from robustness.core.errors import UnknownNameError

#: L-inf budgets and distances are written in units of 1/255: the levels of an 8-bit image.
EPS_UNIT = 255
#: In units of 1/255: only values that *are* k/255 (or k/4 of 1/255) up to float rounding print as such.
EPS_TOLERANCE = 1e-6
#: Smallest L2 norm divided by: a zero perturbation or gradient stays zero instead of becoming NaN.
_MIN_L2 = 1e-12


def per_sample(values: Any, like: Any) -> Any:
    """``values`` [B] viewed as [B, 1, ..., 1] to broadcast over ``like`` [B, ...]; a plain number as it is."""
    import torch
    return values.view(-1, *([1] * (like.dim() - 1))) if torch.is_tensor(values) else values


def whole_levels(k: float) -> int | None:
    """``k`` (a value in units of 1/255) as a whole number of levels >= 1 when it is one up to float rounding."""
    return round(k) if round(k) >= 1 and abs(k - round(k)) <= EPS_TOLERANCE else None


def quarter_levels(k: float) -> float | None:
    """``k`` (in units of 1/255) as a positive multiple of 1/4 when it is one up to float rounding."""
    exact = abs(4 * k - round(4 * k)) <= 4 * EPS_TOLERANCE and round(4 * k) > 0
    return round(4 * k) / 4 if exact else None


class Norm:
    """A threat model. Subclasses set the class attributes and implement the tensor methods.

    ``name``: the word in flags, configs and records (and the records' column holding the distance);
    ``title``: how tables name it (``L∞``); ``plain_title``: how plain-text lines name it (``L-inf``);
    ``axis_scale`` / ``axis_label``: a plot's eps axis (values times the scale); ``atol`` / ``rtol``: the float32
    rounding the budget check accepts (:meth:`limit`).
    """

    name: str = ""
    title: str = ""
    plain_title: str = ""
    axis_scale: float = 1.0
    axis_label: str = ""
    atol: float = 0.0
    rtol: float = 0.0

    def __repr__(self) -> str:
        return f"<norm {self.name}>"

    def distance(self, delta: Any) -> Any:
        """Per-sample norm of ``delta`` [B, ...] -> [B], in float64 (computed on ``delta`` as given: a float64
        difference for the records, the attack's own float32 one where it compares)."""
        flat = delta.detach().flatten(1).double()
        if flat.shape[1] == 0:
            return flat.new_zeros(flat.shape[0])
        return self._flat_norm(flat)

    def limit(self, eps: float) -> float:
        """The largest distance the budget check accepts for budget ``eps``: eps plus the rounding tolerance."""
        return math.inf if math.isinf(eps) else eps * (1 + self.rtol) + self.atol

    def budget_problem(self, eps: float) -> str | None:
        """What is wrong with a requested budget ``eps`` (already a number >= 0) in this norm, as the end of a
        sentence that starts with the budget's name; None when it is usable."""
        return None

    def project(self, delta: Any, eps: Any) -> Any:
        """``delta`` moved into the ball of radius ``eps`` (a float, or one per sample [B]); no [0, 1] clipping."""
        raise NotImplementedError

    def ascent(self, grad: Any) -> Any:
        """The unit step of steepest ascent for ``grad`` [B, ...] in this norm (PGD's step before ``alpha``)."""
        raise NotImplementedError

    def random_start(self, x: Any, eps: Any) -> Any:
        """A random image in the ball of radius ``eps`` (float or [B]) around ``x`` and in [0, 1]."""
        raise NotImplementedError

    def round_budget(self, value: float) -> float:
        """``value`` rounded to a budget people can read and type."""
        raise NotImplementedError

    def format_eps(self, eps: float) -> str:
        """A budget in the run's units (``inf`` unbounded, ``0`` none)."""
        eps = float(eps)
        if math.isinf(eps):
            return "inf"
        return "0" if eps == 0 else self._eps_text(eps)

    def format_distance(self, value: float) -> str:
        """A perturbation size for people (``inf`` none found, ``-`` not measured)."""
        value = float(value)
        if math.isinf(value):
            return "inf"
        return "-" if math.isnan(value) else self._distance_text(value)

    def _flat_norm(self, flat: Any) -> Any:
        raise NotImplementedError

    def _eps_text(self, eps: float) -> str:
        return f"{eps:.4g}"

    def _distance_text(self, value: float) -> str:
        return f"{value:.3g}"


class Linf(Norm):
    """L-inf: every pixel moves by at most eps; budgets and distances are written in units of 1/255."""

    name, title, plain_title = "linf", "L∞", "L-inf"
    axis_scale, axis_label = float(EPS_UNIT), f"eps (x 1/{EPS_UNIT})"
    atol = 1e-6

    def budget_problem(self, eps: float) -> str | None:
        """Above 1 (unbounded included): images are in [0, 1], and a value such as 8 most likely meant 8/255."""
        if eps > 1:
            return f"{eps:g} is outside [0, 1]: images are in [0, 1] (did you mean {eps:g}/{EPS_UNIT}?)"
        return None

    def _flat_norm(self, flat: Any) -> Any:
        return flat.abs().amax(1)

    def project(self, delta: Any, eps: Any) -> Any:
        r = per_sample(eps, delta)
        return delta.clamp(-r, r)

    def ascent(self, grad: Any) -> Any:
        return grad.sign()

    def random_start(self, x: Any, eps: Any) -> Any:
        """Uniform in the cube (then clipped to [0, 1])."""
        import torch
        if torch.is_tensor(eps):
            adv = x + (torch.rand_like(x) * 2 - 1) * per_sample(eps, x)
            return (x + self.project(adv - x, eps)).clamp(0.0, 1.0)
        return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0.0, 1.0)

    def round_budget(self, value: float) -> float:
        """From 0.5/255 up to the nearest quarter of 1/255; below it two significant digits of 1/255."""
        if value * EPS_UNIT >= 0.5:
            return round(value * EPS_UNIT * 4) / (4 * EPS_UNIT)
        return float(f"{value * EPS_UNIT:.2g}") / EPS_UNIT

    def _eps_text(self, eps: float) -> str:
        """Below 1 always in 1/255 (``0.47/255``, ``17.5/255``: a decimal beside ``0.75/255`` reads as another
        unit); 1 and above as a decimal."""
        if eps >= 1:
            return f"{eps:.4g}"
        k = eps * EPS_UNIT
        whole, quarter = whole_levels(k), quarter_levels(k)
        if whole is not None:
            return f"{whole}/{EPS_UNIT}"
        if quarter is not None:
            return f"{quarter:g}/{EPS_UNIT}"
        return f"{k:.3g}/{EPS_UNIT}"

    def _distance_text(self, value: float) -> str:
        """In 1/255; a quarter step such as ``20.75/255`` exactly, as ``--eps auto`` rounds its budgets."""
        k = value * EPS_UNIT
        quarter = quarter_levels(k) if 1 <= k < EPS_UNIT else None
        return f"{quarter:g}/{EPS_UNIT}" if quarter is not None else f"{k:.3g}/{EPS_UNIT}"


class L2(Norm):
    """L2: the Euclidean length of the perturbation over all pixels; written as decimals."""

    name, title, plain_title = "l2", "L2", "L2"
    axis_label = "eps (L2)"
    atol, rtol = 1e-6, 1e-5

    def budget_problem(self, eps: float) -> str | None:
        """Any finite radius; an unbounded one is refused."""
        return "must be finite" if math.isinf(eps) else None

    def _flat_norm(self, flat: Any) -> Any:
        return flat.norm(p=2, dim=1)

    def _lengths(self, t: Any) -> Any:
        return t.flatten(1).norm(p=2, dim=1).clamp_min(_MIN_L2)

    def project(self, delta: Any, eps: Any) -> Any:
        import torch
        return delta * per_sample(torch.clamp(eps / self._lengths(delta), max=1.0), delta)

    def ascent(self, grad: Any) -> Any:
        return grad / per_sample(self._lengths(grad), grad)

    def random_start(self, x: Any, eps: Any) -> Any:
        """A uniformly random direction at a uniformly random radius (then projected and clipped to [0, 1])."""
        import torch
        direction = torch.randn_like(x)
        direction = direction / per_sample(self._lengths(direction), x)
        radius = per_sample(torch.rand(x.shape[0], device=x.device, dtype=x.dtype), x)
        adv = x + direction * radius * per_sample(eps, x)
        return (x + self.project(adv - x, eps)).clamp(0.0, 1.0)

    def round_budget(self, value: float) -> float:
        """Two significant digits."""
        return float(f"{value:.2g}") if value > 0 else value


LINF, L2_NORM = Linf(), L2()
_NORMS: dict[str, Norm] = {n.name: n for n in (LINF, L2_NORM)}
#: The threat models by name, in the order flags and tables list them (the first is the default).
NORM_NAMES: tuple[str, ...] = tuple(_NORMS)


def norm_for(name: str) -> Norm:
    """The norm called ``name``; :class:`UnknownNameError` (a ConfigError, one line) naming the known ones."""
    norm = _NORMS.get(str(name))
    if norm is None:
        raise UnknownNameError("norm", str(name), NORM_NAMES)
    return norm


def title_of(name: Any, *, plain: bool = False) -> str:
    """How a report names the norm called ``name``: its :attr:`Norm.title` (``L∞``), with ``plain`` its
    :attr:`Norm.plain_title` (``L-inf``); a word this version does not know as it is."""
    if not is_norm(name):
        return str(name)
    norm = norm_for(name)
    return norm.plain_title if plain else norm.title


def is_norm(name: Any) -> bool:
    """Whether ``name`` is a known norm (records written by another version may carry other words)."""
    return str(name) in _NORMS
