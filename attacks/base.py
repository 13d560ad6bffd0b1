"""The common shape of every attack, whichever library implements it; the registry of (attack, backend); kinds.

An attack is a small class (foolbox 3's ``FixedEpsilonAttack`` / ``MinimizationAttack`` split, torchattacks'
"parameters are keyword arguments with defaults"):

* ``name`` (the record name), ``backend``, the ``norms`` it supports;
* ``kind``: one of :data:`KINDS`. The kind is the ONE place that decides what an attack's records mean: whether
  it counts for accuracy and the worst case (every kind but :data:`COMPUTE`), whether routing gradients matter
  (not for :data:`GRADIENT_FREE`), which sanity check reads it;
* ``Params``: a frozen dataclass of its parameters with their defaults (shared ones in :mod:`attacks.params`).

``attack(target, x, y, eps, seed)`` (:meth:`Attack.__call__`, final) sweeps the budgets; a subclass implements
``run`` (one budget at a time), or ``perturb`` (all positive budgets in one call: libraries that sweep a list of
budgets in one call, such as foolbox, keep doing so), or, as a :class:`MinimalAttack`, ``minimize``. For the
fixed-budget kinds (:data:`TRACKED_KINDS`) ``__call__`` also owns which example comes back: every candidate the
attack evaluates is offered to a :class:`attacks.tracking.BestAdversarial`, which keeps per sample the first one
that fools the deployed forward. The runner does the rest identically for every backend: budget checks, the
deterministic re-evaluation that decides success, gate capture and records. Adding an attack is one new file that
defines such a class and registers it (``@register``).

Backends: every module of the :mod:`attacks.backends` package is found by discovery (``pkgutil`` over the
package's path, on first use of the registry) and imported; a module that fails to import (its optional library is
missing) disables only its own attacks and is reported once (:func:`unavailable_backends`). Adding a backend is one
new module in that package. The built-in ones:

* ``native`` (:mod:`attacks.backends.native_pgd`, :mod:`attacks.backends.native_bisect`,
  :mod:`attacks.backends.native_refine`, :mod:`attacks.backends.native`): the suite's PGD (CE and margin losses,
  restarts), the per-sample minimal distance by bisection over eps with that PGD (``pgd-bisect``) and below the
  run's best known distance (``pgd-refine``), and the gate-aware attacks path and slowdown;
* ``torchattacks`` (:mod:`attacks.backends.torchattacks`): fgsm, pgd, apgd-ce, apgd-dlr, square, autoattack;
* ``foolbox`` (:mod:`attacks.backends.foolbox`): fgsm, pgd, and the minimal-norm cw (binary search over c), ddn
  (L2) and fmn (L-inf).

Shapes everywhere: images [B, C, H, W] in [0, 1]; labels [B] (int64, of the attacked head).
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import pkgutil
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from attacks.adapters import LogitsView, eval_logits, gives_deployed_logits
from attacks.checks import check_budget
from attacks.tracking import BestAdversarial, NonFinite, finite_rows, within_budgets
from attacks.params import NoParams
from models.network import CoarseFineNet, ModelOutput
from models.protocol import adapt
from robustness.core.config import build
from robustness.core.errors import ConfigError, UnknownNameError
from robustness.core.norms import per_sample
from robustness.core.runtime import seed_everything
from robustness.core.vocab import NORMS

#: the built-in backends in their order of preference (a plug-in's own backend name comes after them)
BACKENDS = ("native", "torchattacks", "foolbox")
#: the package whose every module is an attack backend (:func:`backend_modules`)
BACKEND_PACKAGE = "attacks.backends"
log = logging.getLogger(__name__)

SINGLE_STEP = "single-step"
ITERATIVE = "iterative"
GRADIENT_FREE = "gradient-free"
MINIMAL = "minimal"
COMPUTE = "compute"
#: What an attack is: one gradient step; an iterative gradient attack; a query-only search (the routing gradient
#: does not matter); a minimal-perturbation attack run once for all budgets; an attack on compute, not labels.
KINDS = (SINGLE_STEP, ITERATIVE, GRADIENT_FREE, MINIMAL, COMPUTE)
#: Fixed-budget kinds: their result per sample is the best candidate they evaluated (attacks.tracking).
TRACKED_KINDS = (SINGLE_STEP, ITERATIVE, GRADIENT_FREE)


@dataclass
class Target:
    """What is attacked: a model, the head whose labels are attacked, and how its gates behave for the attacker.

    ``gate_mode`` is the forward mode (the model is attacked *and* evaluated in it); ``gate_grad`` is the
    routing gradient the attacker differentiates through (only meaningful for a gated model in ``hard`` mode);
    ``temperature`` the per-gate temperatures of the ``sharp`` routing gradient (calibrated on the clean batch by
    the runner; None: the model calibrates on each batch it sees). ``tracker`` is set by :meth:`Attack.__call__`
    while a fixed-budget attack runs (:class:`attacks.tracking.BestAdversarial`); ``keep_first`` (True) makes it
    keep the first fooling candidate; the runner sets it False when crafting for transfer, where the most
    confident candidate on the source model transfers better.
    """

    model: CoarseFineNet | torch.nn.Module
    head: str = "fine"
    gate_mode: str = "hard"
    gate_grad: str = "none"
    eot_samples: int = 8
    device: torch.device | None = None
    temperature: torch.Tensor | None = None
    tracker: BestAdversarial | None = None
    keep_first: bool = True
    nonfinite: NonFinite | None = None
    #: the attack cascade (:mod:`attacks.runner.cascade`): per budget, bool [B] of the samples an earlier attack of
    #: the run already fooled there; a fixed-budget attack leaves them alone (its tracker counts them as settled)
    settled: dict[float, torch.Tensor] | None = None
    #: for an attack that ``refines`` (a minimal search below what is known): float64 [B], per sample the smallest
    #: distance in the attack's norm at which any earlier evaluation of the run fooled it (inf where none did)
    upper_bound: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.model = adapt(self.model)  # any nn.Module: a plain classifier becomes a static single-head model
        if self.device is None:
            self.device = next(self.model.parameters()).device

    def view(self, observed: bool = True, index: torch.Tensor | None = None) -> LogitsView:
        """A fresh logits-only view (what the libraries call); ``observed``: it offers every batch to the tracker
        (as the samples ``index`` of the tracked batch when the library is handed only those)."""
        observer: Any = self.tracker
        if observer is None and self.nonfinite is not None:
            observer = _GradientWatch(self.nonfinite)  # outside a tracked attack: non-finite values are still seen
        return LogitsView(self.model, head=self.head, gate_mode=self.gate_mode, gate_grad=self.gate_grad,
                          eot_samples=self.eot_samples, temperature=self.temperature,
                          observer=observer if observed else None, observed_index=index)

    def on_pending(self, x: torch.Tensor, y: torch.Tensor, eps: float, attack) -> torch.Tensor:
        """Run ``attack(view, xs, ys) -> adv`` on the samples still to attack at ``eps`` only (all of them outside a
        tracked attack) and return the full batch (the clean image elsewhere). Samples fooled at a smaller budget
        or misclassified clean cost nothing."""
        index = self.tracker.pending(eps) if self.tracker is not None else None
        if index is None:
            return attack(self.view(), x, y)
        out = x.clone()
        if index.numel():
            adv = attack(self.view(index=index), x.index_select(0, index), y.index_select(0, index)).detach()
            self.offer(adv, None, index)
            out[index] = adv.to(x.dtype)
        return out

    def forward(self, x: torch.Tensor) -> ModelOutput:
        """The full model output under the attacker's gate mode and routing gradient (with gradients)."""
        extra = {"temperature": self.temperature} if self.temperature is not None else {}
        with self.model.gating(mode=self.gate_mode, gate_grad=self.gate_grad, eot_samples=self.eot_samples, **extra):
            return self.model(x)

    @property
    def deployed_logits(self) -> bool:
        """Whether the attacker's forward values are exactly the deterministic deployed forward's."""
        return gives_deployed_logits(self.model, self.gate_mode, self.gate_grad)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic no-grad logits of the attacked head (routing gradient ``none``)."""
        return eval_logits(self.model, x, self.head, self.gate_mode)

    def offer(self, candidate: torch.Tensor, logits: torch.Tensor | None = None,
              index: torch.Tensor | None = None) -> None:
        """Offer a candidate batch to the tracker (nothing happens outside a tracked attack)."""
        if self.tracker is not None:
            self.tracker.offer(candidate, logits, index)


@dataclass
class _GradientWatch:
    """The model view's observer outside a tracked attack: it only notes non-finite input gradients and logits."""

    nonfinite: NonFinite

    def offer(self, x: torch.Tensor, logits: torch.Tensor | None = None, index: torch.Tensor | None = None) -> None:
        seen = self.nonfinite
        if index is None and x.shape[0] != seen.batch_size:
            return
        seen.watch_gradient(x, index)
        if logits is not None:
            seen.note("logits", finite_rows(x) & ~finite_rows(logits), index)


def _finite_or_clean(x: torch.Tensor, adv: torch.Tensor, seen: NonFinite) -> torch.Tensor:
    """``adv`` with every sample that holds a non-finite pixel replaced by its clean image (noted in ``seen``)."""
    if adv.shape != x.shape:
        return adv  # the budget check says what is wrong
    bad = ~finite_rows(adv)
    if not bad.any():
        return adv
    seen.note("image", bad)
    return torch.where(per_sample(bad, x), x.to(adv.dtype), adv)


class Attack(ABC):
    """Base class: one attack of one backend, with its parameters (``self.params``, an instance of ``Params``).

    ``Attack(norm, params=None, **overrides)``: ``params`` is a ``Params`` instance (default: ``Params()``),
    ``overrides`` replace single fields. An unknown or ill-typed parameter is a ConfigError naming the attack,
    the key and the valid keys.

    Implement ``run`` (one budget) or ``perturb`` (every positive budget at once). Whatever is returned is used
    exactly as returned: no projection or clipping is added here, because ``x + (adv - x)`` is not ``adv`` in
    float arithmetic and records must not change with the plumbing. Each example must already lie in its budget
    and in [0, 1]; the runner checks that and refuses the evaluation otherwise.
    """

    name: ClassVar[str] = ""
    backend: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    norms: ClassVar[tuple[str, ...]] = NORMS
    Params: ClassVar[type] = NoParams
    #: another attack whose configured values of the parameters ``inherited_params`` are this one's defaults
    #: ('' for none; ``attacks.runner.config.AttackConfig.options_for``): ``pgd-bisect`` searches with the run's PGD
    inherits: ClassVar[str] = ""
    inherited_params: ClassVar[tuple[str, ...]] = ()
    #: a minimal attack that searches below each sample's best known adversarial distance (``Target.upper_bound``):
    #: the runner plans it after every other attack and hands it the bounds from their records
    refines: ClassVar[bool] = False

    def __init__(self, norm: str = "linf", params: Any = None, **overrides: Any):
        if norm not in self.norms:
            raise UnknownNameError(f"norm for attack {self.name!r}", norm, self.norms)
        self.norm = norm
        if params is not None and not isinstance(params, self.Params):
            raise ConfigError(f"attack {self.name!r}: params must be a {self.Params.__name__}, "
                              f"got {type(params).__name__}")
        values = {**(dataclasses.asdict(params) if params is not None else {}), **overrides}
        self.params = build(self.Params, values, where=f"attack {self.name!r} ({self.backend})")

    def config(self) -> dict[str, Any]:
        """The attack's norm and parameters, for the manifest."""
        return {"norm": self.norm, **dataclasses.asdict(self.params)}

    @typing.final
    def __call__(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float],
                 seed: int) -> list[torch.Tensor]:
        """One adversarial batch per budget in ``eps`` (same order); eps 0 is the clean image itself (a copy).

        Seeds every generator with ``seed`` once, then hands the positive budgets to :meth:`perturb` in one call.
        For a fixed-budget attack (:data:`TRACKED_KINDS`) that call runs under a
        :class:`attacks.tracking.BestAdversarial`: what is returned per sample and budget is the first candidate
        the attack evaluated (or returned) that fools the deployed forward, else its lowest-margin one.
        """
        positive = [e for e in eps if e > 0]
        seed_everything(seed)
        made: list[torch.Tensor] = []
        seen = NonFinite(x.shape[0], x.device)
        if target is not None:  # a compute attack may need no model at all
            target = dataclasses.replace(target, nonfinite=seen)
        if positive and self.kind in TRACKED_KINDS:
            tracker = BestAdversarial(target, x, y, positive, self.norm, keep_first=target.keep_first,
                                      nonfinite=seen)
            returned = self.perturb(dataclasses.replace(target, tracker=tracker), x, y, positive, seed)
            self._check_count(returned, positive)
            for e, adv in zip(positive, returned):
                # a NaN pixel is a failed step, not an example: rejected (and counted) before the budget check
                adv = _finite_or_clean(x, adv.detach(), seen)
                # a library that returns an example outside its budget is broken: say so, never drop it silently
                check_budget(x, adv, e, self.norm, attack=self.name, backend=self.backend)
                tracker.offer(adv)
            made = [tracker.best(k) for k in range(len(positive))]
        elif positive:
            made = self.perturb(target, x, y, positive, seed)
            self._check_count(made, positive)
            made = [_finite_or_clean(x, adv.detach(), seen) for adv in made]
        self._report_nonfinite(target, seen)
        it = iter(made)
        return [x.clone() if e == 0 else next(it).detach().to(x.dtype) for e in eps]

    def _report_nonfinite(self, target: Target, seen: NonFinite) -> None:
        """Log what non-finite values this call met: a warning the first time per evaluation (this attack object
        under one gate mode, routing gradient and head), then debug lines with running totals."""
        counts = seen.counts()
        if not any(counts.values()):
            return
        key = (target.gate_mode, target.gate_grad, target.head, target.keep_first)
        totals = self.__dict__.setdefault("_nonfinite_totals", {})
        first = key not in totals
        total = totals.setdefault(key, dict.fromkeys(counts, 0))
        for kind, k in counts.items():
            total[kind] += k
        where = (f"attack {self.name!r} ({self.backend}, {self.norm}) with {target.gate_mode} gates, routing gradient "
                 f"{target.gate_grad}, {target.head} head")
        if first:
            log.warning("%s: %s in a batch of %d; such samples are never scored on a non-finite image, and rows whose "
                        "logits are non-finite are recorded with nonfinite=True (not robust, not a success); later "
                        "batches of this evaluation are logged at debug level", where, seen.describe(),
                        seen.batch_size)
        else:
            log.debug("%s: %s in a batch of %d (so far, samples with a non-finite gradient / image / logits: %s)",
                      where, seen.describe(), seen.batch_size,
                      " / ".join(str(total[kind]) for kind in NonFinite.KINDS))

    def _check_count(self, made: Sequence[torch.Tensor], eps: Sequence[float]) -> None:
        if len(made) != len(eps):
            raise RuntimeError(f"attack {self.name!r} ({self.backend}) returned {len(made)} batches for "
                               f"{len(eps)} budgets")

    def perturb(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float],
                seed: int) -> list[torch.Tensor]:
        """One adversarial batch per (positive) budget in ``eps``; by default :meth:`run` once per budget."""
        return [self.run(target, x, y, e, seed) for e in eps]

    def run(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
        """The adversarial batch at one budget ``eps``, within it and in [0, 1]."""
        raise NotImplementedError(f"{type(self).__name__} implements neither run nor perturb")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"


class MinimalAttack(Attack):
    """A minimal-perturbation attack (CW, DDN): run once, unbounded, then scored per budget.

    :meth:`minimize` returns per sample the smallest adversarial example it found and whether it found one; at a
    budget the example is used only if its norm fits, otherwise the clean image stands (as it does for an example
    with a non-finite pixel: rejected and counted). The runner also scores it
    at eps = inf: that row holds each sample's minimal norm and whether one was found at all (its convergence).
    """

    kind: ClassVar[str] = MINIMAL

    @abstractmethod
    def minimize(self, target: Target, x: torch.Tensor, y: torch.Tensor,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(best [B, C, H, W], found [B] bool)``: ``best`` is the clean image where nothing was found."""

    def perturb(self, target: Target, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float],
                seed: int) -> list[torch.Tensor]:
        best, found = self.minimize(target, x, y, seed)
        bad = ~finite_rows(best)
        if target.nonfinite is not None:
            target.nonfinite.note("image", bad & found)
        return within_budgets(x, best, found & ~bad, eps, self.norm)


# --------------------------------------------------------------------------------------------------------------
# Registry and kinds
# --------------------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, dict[str, type[Attack]]] = {}
_UNAVAILABLE: dict[str, str] = {}


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator: make ``cls`` available as (``cls.name``, ``cls.backend``) with its kind and Params."""
    if not cls.name or not cls.backend:
        raise TypeError(f"{cls.__name__} needs a name and a backend to be registered")
    if cls.kind not in KINDS:
        raise TypeError(f"{cls.__name__}.kind must be one of {', '.join(KINDS)}, got {cls.kind!r}")
    if not dataclasses.is_dataclass(cls.Params):
        raise TypeError(f"{cls.__name__}.Params must be a dataclass")
    others = {other.kind for b, other in _REGISTRY.get(cls.name, {}).items() if b != cls.backend}
    if others and others != {cls.kind}:
        raise TypeError(f"attack {cls.name!r} is {others.pop()!r} in another backend, {cls.kind!r} in {cls.backend}")
    _REGISTRY.setdefault(cls.name, {})[cls.backend] = cls
    return cls


def unregister(name: str, backend: str | None = None) -> None:
    """Remove attack ``name`` (of one ``backend``, or of all): for plug-ins and tests."""
    if backend is None:
        _REGISTRY.pop(name, None)
        return
    _REGISTRY.get(name, {}).pop(backend, None)
    if not _REGISTRY.get(name, True):
        del _REGISTRY[name]


_DISCOVERED: dict[tuple[str, ...], list[str]] = {}


def backend_modules() -> list[str]:
    """Every module of :data:`BACKEND_PACKAGE`, found on the package's path (``pkgutil``; names starting with
    ``_`` are private helpers), sorted: no list of them is kept by hand."""
    package = importlib.import_module(BACKEND_PACKAGE)
    path = tuple(str(p) for p in package.__path__)
    if path not in _DISCOVERED:  # the path changes only when a plug-in or a test extends it
        _DISCOVERED[path] = sorted(f"{BACKEND_PACKAGE}.{m.name}" for m in pkgutil.iter_modules(list(path))
                                   if not m.name.startswith("_"))
    return _DISCOVERED[path]


def unavailable_backends() -> dict[str, str]:
    """The backend modules that failed to import, each with the error (a missing optional library)."""
    _load()
    return dict(_UNAVAILABLE)


def _load() -> None:
    """Import every backend module (each registers its attacks); one that fails to import is reported once."""
    for module in backend_modules():
        if module in _UNAVAILABLE:
            continue
        try:
            importlib.import_module(module)
        except ImportError as err:
            _UNAVAILABLE[module] = str(err)
            log.warning("attack backend %s is unavailable: %s", module.rsplit(".", 1)[-1], err)


def known_backends() -> list[str]:
    """Every backend some registered attack runs in: :data:`BACKENDS` first (all of them, even one whose library
    is missing), then any other, sorted."""
    _load()
    others = {b for classes in _REGISTRY.values() for b in classes} - set(BACKENDS)
    return [*BACKENDS, *sorted(others)]


def known_attacks() -> list[str]:
    """Every registered attack name."""
    _load()
    return sorted(_REGISTRY)


def backends_for(name: str) -> list[str]:
    """Backends that implement attack ``name`` (:data:`BACKENDS` order first, then any other, sorted)."""
    _load()
    if name not in _REGISTRY:
        raise UnknownNameError("attack", name, known_attacks())
    return sorted(_REGISTRY[name], key=lambda b: (BACKENDS.index(b) if b in BACKENDS else len(BACKENDS), b))


def attack_class(name: str, backend: str) -> type[Attack]:
    """The class implementing ``name`` in ``backend``."""
    if backend not in backends_for(name):
        raise UnknownNameError(f"backend for attack {name!r}", backend, backends_for(name))
    return _REGISTRY[name][backend]


def attack_kind(name: str) -> str | None:
    """The kind of registered attack ``name``; None if no attack has that name."""
    _load()
    classes = _REGISTRY.get(name)
    return next(iter(classes.values())).kind if classes else None


def counts_for_accuracy(name: str) -> bool:
    """Whether ``name``'s records count for robust accuracy and the worst case: all but compute attacks (and
    names that are not registered, so that records of an unknown attack are never silently dropped)."""
    return attack_kind(name) != COMPUTE


def attacks_of_kind(*kinds: str) -> list[str]:
    """Registered attack names of any of ``kinds``, sorted."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UnknownNameError("attack kind", unknown[0], KINDS)
    _load()
    return sorted(name for name in _REGISTRY if attack_kind(name) in kinds)
