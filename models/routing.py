"""Routing gradients: what an attacker differentiates through a gated model's hard gates (``gate_grad``).

One :class:`RoutingGradient` object per mode, registered by name; the name is the same word in the flag
(``--gate-grad``), the config (``gate_grads``), the model (``model(x, gate_grad=...)``, ``GateState.gate_grad``)
and the records' ``gate_grad`` column. The built-in modes are one module each in :mod:`models.routing_grads`
(registered in the order ``none, ste, bpda, eot, sharp`` when :mod:`models` is imported). A new mode is one new
file: a subclass with its ``name`` and behaviour, decorated with :func:`register_routing_gradient`; importing that
module puts it in ``--gate-grad``'s help, AttackConfig's validation and every model's forward.

An entry owns:

* :meth:`RoutingGradient.forward`: a gated model's ``hard`` evaluation forward under this gradient (its values and
  the graph the attacker's backward follows); the helper :func:`hard_values` returns the deployed network's
  values with another network's gradient (BPDA, Athalye et al. 2018).
* :meth:`RoutingGradient.hard_decision`: a hook into each hard gate's decision (``ste``: straight-through).
* :meth:`RoutingGradient.surrogate`: the network whose prediction the attacker follows, for the fidelity probe
  (:mod:`models.surrogates`).
* ``exact_on_hard``: whether its ``hard`` forward values are the deterministic deployed forward's bit for bit (then
  an attack may judge its iterate by them, :func:`attacks.adapters.gives_deployed_logits`);
  ``needs_temperature``: whether it reads the per-gate temperature calibrated once on clean inputs (the runner
  passes it); ``without_scores``: the mode a gated model that exposes no gate scores runs instead (``ste`` has no
  score to pass straight through); ``adaptive``: whether it is an adaptive routing gradient (everything but the
  naive ``none``), compared against ``none`` by the sanity checks.

Entries call the model's ``_run(x, state)`` (one forward in ``state``) and its public forward; they never import
:mod:`models.network`, which dispatches to them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Callable, ClassVar, Iterator, TypeVar

from robustness.core.errors import UnknownNameError

__all__ = ["RoutingGradient", "register_routing_gradient", "unregister_routing_gradient", "routing_gradient", "GRAD_MODES", "ROUTING_GRADIENTS",
           "hard_values"]


class RoutingGradient:
    """One routing gradient. Subclasses set ``name`` and ``summary`` and override what differs from the naive
    evaluation (the defaults: the deployed hard forward, its own gradient, no hook)."""

    name: ClassVar[str] = ""
    #: one line for ``--help`` and the docs
    summary: ClassVar[str] = ""
    exact_on_hard: ClassVar[bool] = False
    needs_temperature: ClassVar[bool] = False
    without_scores: ClassVar[str | None] = None
    adaptive: ClassVar[bool] = True

    def __repr__(self) -> str:
        return f"<routing gradient {self.name}>"

    def forward(self, net: Any, x: Any, state: Any) -> Any:
        """The ``hard``-mode forward of gated model ``net`` (in eval mode) on ``x`` under gate state ``state``
        (whose ``gate_grad`` is this entry's name): a ``ModelOutput`` whose logits the attack differentiates."""
        return net._run(x, state)

    def hard_decision(self, score: Any, executed: Any, hard: Any) -> Any:
        """A hard gate's decision under this gradient (``score`` [B], ``executed`` bool [B], ``hard`` its float
        copy), or None for the deployed decision (values ``hard``, no gradient through the routing)."""
        return None

    def surrogate(self, net: Any, x: Any, temperature: Any = None) -> Any:
        """The output of the network whose prediction the attacker follows (eval mode; ``temperature``: the
        calibrated per-gate temperatures, or None). Default: this gradient's own ``hard`` forward."""
        extra = {"temperature": temperature} if self.needs_temperature and temperature is not None else {}
        return net(x, mode="hard", gate_grad=self.name, **extra)


def hard_values(hard: Any, surrogate: Any) -> Any:
    """``hard``'s outputs bit for bit, with ``surrogate``'s gradient (adding an exact zero that carries it); the
    surrogate's scores and gate values (what its graph went through)."""
    def route(h: Any, s: Any) -> Any:
        return None if h is None or s is None else h + (s - s.detach())

    return dataclasses.replace(hard, fine=route(hard.fine, surrogate.fine), coarse=route(hard.coarse, surrogate.coarse),
                               scores=surrogate.scores, values=surrogate.values)


_ROUTING_GRADIENTS: dict[str, RoutingGradient] = {}
_Cls = TypeVar("_Cls", bound=type)


def register_routing_gradient(cls: _Cls) -> _Cls:
    """Class decorator: register one instance of ``cls`` under ``cls.name`` (a later registration of the same name
    replaces the earlier one, as a reloaded plug-in module does)."""
    name = str(cls.name)
    if not name or name != name.lower() or "__" in name or any(c in name for c in ", /"):
        raise ValueError(f"a routing gradient needs a lower-case name without ',', '/', ' ' or '__', got {name!r}")
    _ROUTING_GRADIENTS[name] = cls()
    return cls


def unregister_routing_gradient(name: str) -> None:
    """Forget routing gradient ``name`` (a plug-in's or a test's); UnknownNameError if it is not registered."""
    if name not in _ROUTING_GRADIENTS:
        raise UnknownNameError("gate gradient", name, list(_ROUTING_GRADIENTS))
    del _ROUTING_GRADIENTS[name]


def routing_gradient(name: str) -> RoutingGradient:
    """The registered routing gradient ``name``; :class:`UnknownNameError` (a ConfigError) naming the others."""
    entry = _ROUTING_GRADIENTS.get(name)
    if entry is None:
        raise UnknownNameError("gate gradient", name, list(_ROUTING_GRADIENTS))
    return entry


class _Names(Sequence):
    """A read-only, live view of registered names (in registration order) that pass ``keep``: a plug-in
    registered after import time is in it (``--gate-grad``'s help, AttackConfig's validation)."""

    def __init__(self, keep: Callable[[RoutingGradient], bool]):
        self._keep = keep

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n, g in _ROUTING_GRADIENTS.items() if self._keep(g))

    def __getitem__(self, index):  # type: ignore[override]
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __repr__(self) -> str:
        return repr(self._names())


#: Every routing gradient, in registration order (the built-ins ``none, ste, bpda, eot, sharp`` first: a seed
#: derived from a position, as ``robustness.bench.reference`` derives one, stays put when a plug-in is added).
GRAD_MODES: Sequence[str] = _Names(lambda g: True)
#: The adaptive routing gradients (everything but the naive ``none``).
ROUTING_GRADIENTS: Sequence[str] = _Names(lambda g: g.adaptive)
