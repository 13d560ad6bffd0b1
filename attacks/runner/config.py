"""What an attack run asks for: :class:`AttackConfig`, its ``[attack]`` table, and each attack's parameters.

General options (attacks, budgets, backends, gate modes, data size, seed, ...) are fields of the config; every
attack's own parameters live in ``params`` (``{attack name: {key: value}}``, the ``[attack.<name>]`` subtables of
a config file, e.g. ``[attack.pgd]`` with ``restarts = 5``) and are checked against that attack's ``Params``.

``steps``, when set, is the iteration count of every iterative and compute attack that has a ``steps`` parameter
(PGD, APGD, path, slowdown, and any such attack registered later) unless its subtable sets it; unset (the
default), each attack keeps its own default (PGD 50 x 5 restarts, APGD 100).

``backends`` is an ordered preference: each attack runs in the first listed backend that implements it (the
suite's own ``native`` attacks run even when ``native`` is not listed, if no listed backend has them);
``cross_check = true`` (or ``backends = "both"``) runs it in every listed backend that implements it. An attack's
parameters have one spelling, its own subtable: the flat names of earlier versions (``pgd_restarts``, ``cw_c``,
``apgd_steps``, ...) are refused in one line naming that spelling (:data:`RETIRED_OPTIONS`, a message table only).

``subset`` says which ``n`` test images are attacked (:mod:`robustness.data.subset`): ``"stratified"`` (the
default) draws them as equally per fine class as the split allows, seeded by ``subset_seed``; ``"first"`` takes
the first ``n`` of the test split (the "first n" of published evaluations such as RobustBench's). ``subset_seed``
(0; a non-negative integer below 2**63) is not the attack ``seed``: it stays the same for every model and every
training seed of a comparison, so that they are all attacked on the same images (the manifest records the indices
and a hash of the images; a resume on other images is refused).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

from attacks.base import COMPUTE, ITERATIVE, attack_class, backends_for, known_attacks, known_backends
from attacks.runner.presets import PRESETS, preset_table
from robustness.core.config import (MAX_COUNT, MAX_THREADS, MAX_WORKERS, brief_number, build, check_finite,
                                    default_config_path, load_config_file)
from robustness.core.errors import ConfigError, UnknownNameError
from robustness.core.norms import norm_for
from models.routing import GRAD_MODES
from robustness.core.vocab import ATTACK_GATE_MODES, HEADS, NORMS, parse_eps
from robustness.data.subset import SUBSET_RULES, check_seed

log = logging.getLogger(__name__)

#: [attack] keys that say how this machine runs the attack, not what it measures: never taken from the default
#: config (its CPU, one thread and two workers suit the quickstart's laptop), and free to change on --resume
EXECUTION_KEYS = ("device", "threads", "workers")

#: ``eps = "auto"``: the grid is chosen from the minimal distances (robustness.app.eps_grid); ``batch_size = "auto"``:
#: the batch is sized for the device (attacks.runner.sizing)
AUTO = "auto"
#: attack names a user may ask for (``apgd`` expands to ``apgd-ce`` and ``apgd-dlr``; also as ``[attack.apgd]``)
ATTACK_ALIASES = {"apgd": ["apgd-ce", "apgd-dlr"]}
LIBRARY_BACKENDS = ("torchattacks", "foolbox")
#: kinds whose ``steps`` parameter follows the general ``steps`` unless set per attack
STEPS_KINDS = (ITERATIVE, COMPUTE)

#: flat options of earlier versions, refused: each -> the (attack, parameter) pairs it used to set, for the message
#: naming the spelling that replaced it (not accepted as input)
RETIRED_OPTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "pgd_alpha": (("pgd", "alpha"), ("path", "alpha"), ("slowdown", "alpha")),
    "pgd_random_start": (("pgd", "random_start"), ("path", "random_start"), ("slowdown", "random_start")),
    "pgd_restarts": (("pgd", "restarts"),), "cw_c": (("cw", "initial_c"),), "cw_steps": (("cw", "steps"),),
    "cw_lr": (("cw", "lr"),), "cw_binary_steps": (("cw", "binary_steps"),), "cw_kappa": (("cw", "kappa"),),
    "apgd_steps": (("apgd", "steps"),), "apgd_restarts": (("apgd", "restarts"),),
    "square_queries": (("square", "queries"),), "square_restarts": (("square", "restarts"),),
    "square_p_init": (("square", "p_init"),), "path_lambda": (("path", "lam"),), "path_steps": (("path", "steps"),),
    "slowdown_steps": (("slowdown", "steps"),), "slowdown_label_weight": (("slowdown", "label_weight"),),
}


def retired_option(key: str, value: Any, where: str) -> ConfigError:
    """The one-line error for the flat option ``key`` of earlier versions: the subtable and ``--set`` spelling
    that replaced it, with the value given (``VALUE`` when it is not one number or boolean)."""
    shown = (str(value).lower() if isinstance(value, bool) else repr(value)
             if isinstance(value, (int, float)) else "VALUE")
    (attack, param), *others = RETIRED_OPTIONS[key]
    also = f"; it also set {', '.join(f'[attack.{a}] {p}' for a, p in others)}" if others else ""
    return ConfigError(f"{where}: {key} is no longer an option; write [attack.{attack}] {param} = {shown} (attack "
                       f"--set {attack}.{param}={shown}, run --set attack.{attack}.{param}={shown}){also}")


def split_list(value: Any) -> list[Any]:
    """A list from a list, a comma-separated string or one value (``None``: empty)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        out: list[Any] = []
        for v in value:
            out += split_list(v) if isinstance(v, str) else [v]
        return out
    return [value]


def dedupe(values: Sequence[Any]) -> list[Any]:
    """``values`` in order, each once."""
    return list(dict.fromkeys(values))


@dataclass
class AttackConfig:
    """What to attack with and how. Lists may be given as comma-separated strings; eps as ``"8/255"``.

    ``backends`` is the ordered preference of implementations (``native``, ``torchattacks``, ``foolbox``; ``both`` =
    both libraries with ``cross_check``): each attack runs in the first listed one that has it, or in all of them
    with ``cross_check``. ``norm`` is the threat model of the fixed-budget attacks, ``eps`` their budgets, or
    ``"auto"``: chosen from the minimal distances (``robustness.app.eps_grid``; the fixed-budget attacks then wait until
    the minimal-perturbation attacks have run). Minimal-perturbation attacks (DDN, FMN, CW, pgd-bisect,
    pgd-refine) run in each of their norms that is ``norm`` or in ``distance_norms`` (default both), unbounded (eps =
    inf: each sample's distance; an L2 one under ``--norm linf`` is also scored at ``cw_eps``). ``steps`` (None: each attack's own
    default) sets the iterations of every iterative and compute attack. ``threads`` (0: torch's default) sets
    torch's CPU threads while attacking: 1 is many times faster for small models on a busy CPU. ``workers`` (1) > 1
    splits the batches over that many processes on a CPU (the runner's torchrun sharding, spawned by the runner
    itself; ``n / batch_size`` batches must be at least ``workers`` to gain anything); on a GPU use ``torchrun``
    instead. ``batch_size`` is a positive integer or ``"auto"``: the largest batch that fits on a GPU, a fixed rule
    on a CPU (:mod:`attacks.runner.sizing`; a resumed run keeps the batch size its records were made with).
    ``subset`` (``stratified`` or ``first``) and ``subset_seed`` choose the ``n`` test images attacked (the module
    docstring; the seed is the images', the same for every model and training seed compared, not ``seed``).
    ``minimal_check`` (True) also runs PGD at the minimal-norm attacks' L2 budgets (their convergence check and a
    fixed-budget floor under the L2 numbers). ``cascade`` (True) runs each fixed-budget attack only on the samples
    that the attacks before it (same gate mode, routing gradient, head and norm) left robust, as AutoAttack does
    (:mod:`attacks.runner.cascade`); false attacks every sample with every attack. ``params`` holds each attack's
    own parameters by attack name (an alias such as ``apgd`` sets each of its members').
    """

    attacks: list[str] | str = field(
        default_factory=lambda: ["fgsm", "pgd", "apgd", "ddn", "square", "path", "slowdown"])
    eps: list[float | str] | float | str = field(default_factory=lambda: [1 / 255, 2 / 255, 4 / 255, 8 / 255])
    norm: str = "linf"
    cw_eps: list[float | str] | float | str = field(default_factory=lambda: [0.25, 0.5, 1.0])
    distance_norms: list[str] | str = field(default_factory=lambda: list(NORMS))
    backends: list[str] | str = field(default_factory=lambda: ["native", "torchattacks", "foolbox"])
    cross_check: bool = False
    gate_modes: list[str] | str = field(default_factory=lambda: ["hard"])
    gate_grads: list[str] | str = field(default_factory=lambda: ["none", "ste", "bpda", "sharp"])
    target: str = "fine"
    n: int = 1000
    batch_size: int | Literal["auto"] = 128
    seed: int = 0
    subset: str = "stratified"
    subset_seed: int = 0
    device: str = "auto"
    eot_samples: int = 8
    threads: int = 0
    workers: int = 1
    steps: int | None = None
    preset: str = ""  # the preset the table was built from (from_table / --preset apply it; recorded here)
    minimal_check: bool = True
    cascade: bool = True
    params: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = dedupe(known_attacks() + list(ATTACK_ALIASES))
        self.attacks = [str(a).lower() for a in split_list(self.attacks)]
        if not self.attacks:
            raise ConfigError("no attacks given")
        for name in self.attacks:
            if name not in known:
                raise UnknownNameError("attack", name, known)
        self.norm = str(self.norm).lower()
        if self.norm not in NORMS:
            raise UnknownNameError("norm", self.norm, NORMS)
        if isinstance(self.eps, str) and self.eps.strip().lower() == AUTO:
            self.eps = AUTO
        else:
            self.eps = dedupe([parse_eps(e) for e in split_list(self.eps)])
            if not self.eps:
                raise ConfigError("no eps given")
            _check_eps(self.eps, self.norm, "eps")
        self.cw_eps = dedupe([parse_eps(e) for e in split_list(self.cw_eps)])
        self.distance_norms = dedupe([str(v).lower() for v in split_list(self.distance_norms)])
        for v in self.distance_norms:
            if v not in NORMS:
                raise UnknownNameError("distance norm", v, NORMS)
        _check_eps(self.cw_eps, "l2", "cw_eps")
        backends = [str(b).lower() for b in split_list(self.backends)]
        if "both" in backends:
            self.cross_check = True
        backends = sum((list(LIBRARY_BACKENDS) if b == "both" else [b] for b in backends), [])
        for b in backends:
            if b not in known_backends():
                raise UnknownNameError("backend", b, known_backends() + ["both"])
        self.backends = dedupe(backends)
        if not self.backends:
            raise ConfigError("no backend given")
        self.gate_modes = dedupe([str(m).lower() for m in split_list(self.gate_modes)])
        for m in self.gate_modes:
            if m not in ATTACK_GATE_MODES:
                raise UnknownNameError("gate mode", m, ATTACK_GATE_MODES)
        self.gate_grads = dedupe([str(g).lower() for g in split_list(self.gate_grads)])
        for g in self.gate_grads:
            if g not in GRAD_MODES:
                raise UnknownNameError("gate gradient", g, GRAD_MODES)
        if not self.gate_modes or not self.gate_grads:
            raise ConfigError("gate_modes and gate_grads must not be empty")
        if self.target not in HEADS:
            raise UnknownNameError("target head", str(self.target), HEADS)
        self.batch_size = _batch_size(self.batch_size)
        for name in ("n", "eot_samples") + (("steps",) if self.steps is not None else ()):
            self._positive_int(name)
        if self.preset and self.preset not in PRESETS:
            raise UnknownNameError("attack preset", str(self.preset), sorted(PRESETS))
        self._positive_int("workers", MAX_WORKERS)
        if isinstance(self.threads, bool) or not isinstance(self.threads, (int, np.integer)) or \
                not 0 <= self.threads <= MAX_THREADS:
            raise ConfigError(f"threads must be an integer in 0..{MAX_THREADS} (0: torch's default), got "
                              f"{brief_number(self.threads)}")
        self.threads = int(self.threads)
        for flag in ("cross_check", "minimal_check", "cascade"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        self.seed = check_seed(self.seed, "seed")
        self.subset = str(self.subset).lower()
        if self.subset not in SUBSET_RULES:
            raise UnknownNameError("subset rule", self.subset, SUBSET_RULES)
        self.subset_seed = check_seed(self.subset_seed, "subset_seed")
        self.params = _own_params(self.params)
        asked = set(self.expanded_attacks())
        for name in self.params:
            # an attack that runs is checked against the backends it runs in (warning about an option only another
            # backend has: the default config's native-only [attack.pgd] max_steps under --backend torchattacks);
            # one this invocation leaves out against every backend that has it, silently; a misspelt key is
            # refused either way
            self.options_for(name, loose=name not in asked)

    @property
    def batch_auto(self) -> bool:
        """Whether the batch size is to be chosen for the device (``batch_size = "auto"``:
        :mod:`attacks.runner.sizing`)."""
        return self.batch_size == AUTO

    @property
    def eps_auto(self) -> bool:
        """Whether the fixed-budget grid is still to be chosen from minimal distances (``eps = "auto"``)."""
        return self.eps == AUTO

    def fixed_eps(self) -> list[float]:
        """The fixed-budget grid; ConfigError while it is ``auto`` (resolve it first: ``robustness.app.eps_grid``)."""
        if self.eps_auto:
            raise ConfigError("eps = auto must be resolved into a grid before fixed-budget attacks run")
        return list(self.eps)  # type: ignore[arg-type]

    def _positive_int(self, name: str, high: int = MAX_COUNT) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {brief_number(value)}")
        if value > high:
            raise ConfigError(f"{name} must be at most {high}, got {brief_number(value)}")
        setattr(self, name, int(value))

    @classmethod
    def from_table(cls, table: dict[str, Any], where: str = "[attack]") -> "AttackConfig":
        """The config an ``[attack]`` table describes: general keys and ``[attack.<name>]`` subtables (what config
        files and ``dsn-robust run`` use). A flat option of earlier versions (:data:`RETIRED_OPTIONS`) is a
        ConfigError naming its subtable spelling."""
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table of options, got {type(table).__name__}")
        if table.get("preset"):  # the preset's keys first, the table's own on top
            table = {**preset_table(str(table["preset"])), **table}
        subtables = {k: v for k, v in table.items() if isinstance(v, dict)}
        general = {k: v for k, v in table.items() if k not in subtables}
        retired = next((k for k in general if k in RETIRED_OPTIONS), None)
        if retired is not None:
            raise retired_option(retired, general[retired], where)
        names = {f.name for f in dataclasses.fields(cls)} - {"params"}
        unknown = sorted(set(general) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; valid: "
                              f"{', '.join(sorted(names))} and [attack.<name>] tables")
        return build(cls, {**general, "params": subtables}, where=where)

    def backends_of(self, name: str) -> list[str]:
        """The backends attack ``name`` runs in: the first listed one that implements it (every listed one with
        ``cross_check``); an attack only the suite itself implements runs natively even if ``native`` is not
        listed; [] when none applies."""
        available = backends_for(name)
        listed = [b for b in self.backends if b in available]
        if not listed:
            return ["native"] if available == ["native"] else []
        return listed if self.cross_check else listed[:1]

    def expanded_attacks(self) -> list[str]:
        """Attack names with aliases expanded (``apgd`` -> ``apgd-ce``, ``apgd-dlr``), in order, once each."""
        return dedupe(sum((ATTACK_ALIASES.get(a, [a]) for a in self.attacks), []))

    def options_for(self, name: str, backend: str | None = None, *, loose: bool = False) -> dict[str, Any]:
        """The keyword arguments of attack ``name`` (of ``backend``; default: checked against every backend it
        will run in, or every backend that has it when it runs in none; ``loose``: every backend that has it,
        without the warning about options another backend's class alone has, :func:`_for_backend`): what it
        inherits from another attack's configuration (``Attack.inherits``: ``pgd-bisect``
        takes the run's PGD steps, restarts and losses), the general ``steps`` where it applies, then the attack's
        own ``params``."""
        backends = [backend] if backend else backends_for(name) if loose else (self.backends_of(name)
                                                                                  or backends_for(name))
        options: dict[str, Any] = {}
        for cls in [attack_class(name, b) for b in backends]:
            fields = {f.name for f in dataclasses.fields(cls.Params)}
            general = self.steps is not None and "steps" in fields and cls.kind in STEPS_KINDS
            inherited = {}
            if cls.inherits in known_attacks():
                # the parent as it runs in the child's backend (pgd-bisect takes the native PGD's losses), else
                # in whichever backends it has
                same = cls.backend if cls.backend in backends_for(cls.inherits) else None
                parent = self.options_for(cls.inherits, same, loose=True)
                inherited = {k: parent[k] for k in cls.inherited_params if k in parent}
            own = {**inherited, **({"steps": self.steps} if general else {}),
                   **_for_backend(name, cls, self.params.get(name, {}), warn=not loose)}
            where = f"[attack.{name}] ({cls.backend})"
            _check_param_numbers(own, where)
            build(cls.Params, own, where=where)
            options = own
        return options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_WARNED: set[tuple[str, str, tuple[str, ...]]] = set()


def _for_backend(name: str, cls: type, params: dict[str, Any], warn: bool = True) -> dict[str, Any]:
    """``params`` less the keys that only another backend's ``name`` has (the native PGD's ``max_steps`` for
    torchattacks' PGD): a config stays usable with every backend, and the dropped keys are named once in a
    warning. A key no backend knows is left in, for the Params check to refuse."""
    fields = {f.name for f in dataclasses.fields(cls.Params)}
    elsewhere = {f.name for b in backends_for(name) for f in dataclasses.fields(attack_class(name, b).Params)}
    dropped = tuple(sorted(k for k in params if k not in fields and k in elsewhere))
    if dropped and warn and (name, cls.backend, dropped) not in _WARNED:
        _WARNED.add((name, cls.backend, dropped))
        others = [b for b in backends_for(name)
                  if set(dropped) <= {f.name for f in dataclasses.fields(attack_class(name, b).Params)}]
        log.warning("[attack.%s] %s: an option of %s's %s backend only; %s runs in %s here, without it", name,
                    ", ".join(dropped), name, "/".join(others), name, cls.backend)
    return {k: v for k, v in params.items() if k not in dropped}


def default_attack_table() -> dict[str, Any]:
    """The ``[attack]`` table that ``dsn-robust run`` attacks with by default
    (:func:`robustness.core.config.default_config_path`), less :data:`EXECUTION_KEYS`: the one owner of what
    ``dsn-robust attack`` and the Python API measure without a config; {} (AttackConfig's own defaults, with a
    warning) where that file is not there."""
    path = default_config_path()
    if not path.is_file():
        log.warning("%s not found: attacking with AttackConfig's defaults, not those of `dsn-robust run`", path)
        return {}
    return {k: v for k, v in load_config_file(path).get("attack", {}).items() if k not in EXECUTION_KEYS}


def stored_table(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored config (``AttackConfig.to_dict()``, as a manifest keeps it) as the ``[attack]`` table that
    :meth:`AttackConfig.from_table` reads back into the same config: ``params`` become ``[attack.<name>]``
    subtables."""
    if not isinstance(stored, dict) or not isinstance(stored.get("params", {}), dict):
        raise ConfigError(f"a stored attack config must be a table, got {stored!r}")
    return {**{k: v for k, v in stored.items() if k != "params"}, **(stored.get("params") or {})}


def _batch_size(value: Any) -> int | str:
    """``value`` as a batch size: a positive integer (at most ``MAX_COUNT``) or ``"auto"`` (any case); anything else
    is a ConfigError."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 < value <= MAX_COUNT:
        raise ConfigError(f'batch_size must be a positive integer (at most {MAX_COUNT}) or "auto", got '
                          f'{brief_number(value) if isinstance(value, int) else repr(value)}')
    return int(value)


def _check_param_numbers(values: dict[str, Any], where: str) -> None:
    """Every number of an attack's parameters usable as one, checked before its ``Params`` see it: an int (steps,
    restarts, queries, ...) at most ``MAX_COUNT`` in absolute value, a float finite; the ``Params`` check the finer
    rules (positive, non-negative)."""
    for key, value in values.items():
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and abs(int(value)) > MAX_COUNT:
            raise ConfigError(f"{where}: {key} {brief_number(int(value))} is out of range (at most {MAX_COUNT} in "
                              f"absolute value)")
        check_finite(key, value, where)


def _check_eps(values: list[float], norm: str, name: str) -> None:
    threat = norm_for(norm)
    for e in values:
        if math.isnan(e) or e < 0:
            raise ConfigError(f"{name} {e:g} is negative; budgets are in [0, 1] pixel units")
        problem = threat.budget_problem(e)
        if problem is not None:
            raise ConfigError(f"{name} {problem}")


def _own_params(params: Any) -> dict[str, dict[str, Any]]:
    """A copy of ``params`` with alias names expanded (``apgd`` -> ``apgd-ce`` and ``apgd-dlr``)."""
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"params must map attack names to tables of parameters, got {params!r}")
    known = dedupe(known_attacks() + list(ATTACK_ALIASES))
    out: dict[str, dict[str, Any]] = {}
    for name in params:
        if name not in known:
            raise UnknownNameError("attack (in [attack.<name>])", name, known)
    for alias, members in ATTACK_ALIASES.items():
        for member in members:
            if alias in params:
                out[member] = dict(params[alias])
    for name, values in params.items():
        if name not in ATTACK_ALIASES:
            out[name] = {**out.get(name, {}), **values}
    return out
