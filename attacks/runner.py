"""Batches x evaluations x eps -> per-sample records; budgets checked; resumable; shardable under torchrun.

An *evaluation* is one (attack, backend, norm, gate_mode, gate_grad, target, source_run) with its list of eps.
Its id (a directory name) is ``<attack>__<backend>__<norm>__<gate_mode>__<gate_grad>__<target>``, plus
``__from-<source run>`` for transfer, e.g. ``pgd__torchattacks__linf__hard__bpda__fine``.

Layout written into the run directory::

    attacks/manifest.json                                  what was run (below)
    attacks/records/<evaluation-id>/shard-<batch:05d>.parquet   rows of one batch, every eps (attacks.records)
    attacks/worst_case.parquet                             per-sample worst case over attacks at each eps

The manifest (``schema: dsn-robustness/attacks/v1``) holds: ``run``, ``model``, ``checkpoint`` (relative path),
``dataset`` (DatasetInfo.to_dict()), ``data`` (dataset name, root, options, split), ``seed``, ``n``,
``batch_size``, ``n_batches``, ``versions`` (package versions), ``path_names`` (gate names in path-bit order),
``full_macs``, ``gated_block_macs``, ``zero_grad_share`` (``{"<gate_mode>/<gate_grad>": share}`` of samples whose
input gradient is exactly zero, on the first batch), ``config`` (the AttackConfig of the last invocation) and
``evaluations``: one ``{id, attack, backend, norm, eps, gate_mode, gate_grad, target, source_run, config,
complete}`` per evaluation (``config`` = the attack's parameters; ``complete`` = every shard exists).

Every shard is written atomically, so an interrupted run resumes (``resume=True``) by skipping the shards that
exist. Every batch x evaluation draws its randomness from a seed derived from (seed, evaluation id, batch), so a
resumed or a multi-process run gives the same records as an uninterrupted single-process one. Under ``torchrun``
(``WORLD_SIZE > 1``) rank r takes the batches with ``index % world == r``; rank 0 writes the manifest.

Scoring never trusts an attack library: each adversarial batch is budget-checked (:mod:`attacks.checks`), then
re-evaluated with a deterministic no-grad forward in the evaluation's gate mode (``hard`` = the model's real
hard forward), and once more with the gates frozen to the clean input's path (the frozen-path control).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from attacks.adapters import Evaluation as Outcome
from attacks.adapters import evaluate
from attacks.adaptive import check_transferable, zero_gradient_share
from attacks.backends import BACKENDS, NORMS, Attack, Target, attack_class, backends_for, known_attacks
from attacks.checks import check_budget
from attacks.records import RECORD_COLUMNS, conform, read_records, worst_case
from models.checkpoint import Checkpoint, load_checkpoint
from robustness.core.runtime import package_versions
from robustness.core.runtime import resolve_device, seed_everything
from models.gates import GRAD_MODES
from models.network import CoarseFineNet
from robustness.data import CoarseFineDataset, load_dataset
from robustness.core.config import build
from robustness.core.errors import CheckpointError, ConfigError, RunDirError, UnknownNameError
from robustness.core.rundir import RunDir, atomic_write, atomic_write_json

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = "dsn-robustness/attacks/v1"
#: attack names a user may ask for (``apgd`` expands to ``apgd-ce`` and ``apgd-dlr``)
ATTACK_ALIASES = {"apgd": ["apgd-ce", "apgd-dlr"]}
#: forward modes an evaluation may run in (``soft`` is a relaxation for gradients, ``frozen`` needs a path)
GATE_MODES = ("hard", "open", "random")
TARGETS = ("fine", "coarse")
LIBRARY_BACKENDS = ("torchattacks", "foolbox")
#: attacks left out of worst_case.parquet: their objective is compute, not misclassification
NON_ACCURACY = ("slowdown",)


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


def parse_eps(value: Any) -> float:
    """An eps from a number or a string such as ``"8/255"``, ``"0.03"`` or ``"inf"``."""
    if isinstance(value, bool):
        raise ConfigError(f"eps must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        if text.lower() in ("inf", "infinity"):
            return math.inf
        if "/" in text:
            num, den = text.split("/", 1)
            return float(Fraction(num.strip()) / Fraction(den.strip()))
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"cannot read eps {value!r}; write e.g. 8/255 or 0.03") from None


def _split(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        out: list[Any] = []
        for v in value:
            out += _split(v) if isinstance(v, str) else [v]
        return out
    return [value]


def _dedupe(values: Sequence[Any]) -> list[Any]:
    seen, out = set(), []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


@dataclass
class AttackConfig:
    """What to attack with and how. Lists may be given as comma-separated strings; eps as ``"8/255"``.

    ``backends`` selects the library backends (``torchattacks``, ``foolbox``; ``both``); the gate-aware attacks
    (``path``, ``slowdown``) always run natively. ``norm`` is the threat model of every attack but CW, which is an
    L2 minimal-perturbation attack: with ``norm='linf'`` it is scored at the L2 budgets ``cw_eps``. ``steps`` is
    the iteration count of PGD and, unless set separately, of APGD, path and slowdown.
    """

    attacks: list[str] | str = field(default_factory=lambda: ["fgsm", "pgd", "cw", "apgd", "square", "path", "slowdown"])
    eps: list[float | str] | float | str = field(default_factory=lambda: [1 / 255, 2 / 255, 4 / 255, 8 / 255])
    norm: str = "linf"
    cw_eps: list[float | str] | float | str = field(default_factory=lambda: [0.25, 0.5, 1.0])
    backends: list[str] | str = field(default_factory=lambda: ["torchattacks", "foolbox"])
    gate_modes: list[str] | str = field(default_factory=lambda: ["hard"])
    gate_grads: list[str] | str = field(default_factory=lambda: ["none", "bpda"])
    target: str = "fine"
    n: int = 1000
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    steps: int = 10
    pgd_alpha: float | None = None
    pgd_random_start: bool = True
    pgd_restarts: int = 1
    cw_c: list[float | str] | float | str = field(default_factory=lambda: [0.1, 1.0, 10.0])
    cw_steps: int = 100
    cw_lr: float = 0.01
    cw_binary_steps: int = 5
    cw_kappa: float = 0.0
    apgd_steps: int | None = None
    apgd_restarts: int = 1
    square_queries: int = 1000
    square_restarts: int = 1
    square_p_init: float = 0.8
    path_lambda: float = 1.0
    path_steps: int | None = None
    slowdown_steps: int | None = None
    slowdown_label_weight: float = 0.0
    eot_samples: int = 8

    def __post_init__(self) -> None:
        known = _dedupe(known_attacks() + list(ATTACK_ALIASES))
        self.attacks = [str(a).lower() for a in _split(self.attacks)]
        if not self.attacks:
            raise ConfigError("no attacks given")
        for name in self.attacks:
            if name not in known:
                raise UnknownNameError("attack", name, known)
        self.norm = str(self.norm).lower()
        if self.norm not in NORMS:
            raise UnknownNameError("norm", self.norm, NORMS)
        self.eps = _dedupe([parse_eps(e) for e in _split(self.eps)])
        self.cw_eps = _dedupe([parse_eps(e) for e in _split(self.cw_eps)])
        if not self.eps:
            raise ConfigError("no eps given")
        self._check_eps(self.eps, self.norm, "eps")
        self._check_eps(self.cw_eps, "l2", "cw_eps")
        backends = [str(b).lower() for b in _split(self.backends)]
        backends = sum((list(LIBRARY_BACKENDS) if b == "both" else [b] for b in backends), [])
        for b in backends:
            if b not in BACKENDS:
                raise UnknownNameError("backend", b, list(BACKENDS) + ["both"])
        self.backends = _dedupe(backends)
        if not self.backends:
            raise ConfigError("no backend given")
        self.gate_modes = _dedupe([str(m).lower() for m in _split(self.gate_modes)])
        for m in self.gate_modes:
            if m not in GATE_MODES:
                raise UnknownNameError("gate mode", m, GATE_MODES)
        self.gate_grads = _dedupe([str(g).lower() for g in _split(self.gate_grads)])
        for g in self.gate_grads:
            if g not in GRAD_MODES:
                raise UnknownNameError("gate gradient", g, GRAD_MODES)
        if not self.gate_modes or not self.gate_grads:
            raise ConfigError("gate_modes and gate_grads must not be empty")
        if self.target not in TARGETS:
            raise UnknownNameError("target head", str(self.target), TARGETS)
        self.cw_c = [float(c) for c in _split(self.cw_c)]
        if not self.cw_c or any(not (c > 0 and math.isfinite(c)) for c in self.cw_c):
            raise ConfigError(f"cw_c must be positive numbers, got {self.cw_c}")
        for name in ("n", "batch_size", "steps", "pgd_restarts", "cw_steps", "cw_binary_steps", "apgd_restarts",
                     "square_queries", "square_restarts", "eot_samples"):
            self._positive_int(name)
        for name in ("apgd_steps", "path_steps", "slowdown_steps"):
            if getattr(self, name) is not None:
                self._positive_int(name)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.pgd_alpha is not None and not (float(self.pgd_alpha) > 0):
            raise ConfigError(f"pgd_alpha must be positive (or unset for 2.5*eps/steps), got {self.pgd_alpha}")
        for name in ("cw_lr", "square_p_init"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("cw_kappa", "path_lambda", "slowdown_label_weight"):
            if not float(getattr(self, name)) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        self.pgd_random_start = bool(self.pgd_random_start)

    @staticmethod
    def _check_eps(values: list[float], norm: str, name: str) -> None:
        for e in values:
            if math.isnan(e) or e < 0:
                raise ConfigError(f"{name} {e:g} is negative; budgets are in [0, 1] pixel units")
            if norm == "linf" and e > 1:
                raise ConfigError(f"{name} {e:g} is outside [0, 1]: images are in [0, 1] (did you mean {e:g}/255?)")
            if norm == "l2" and math.isinf(e):
                raise ConfigError(f"{name} must be finite")

    def _positive_int(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        setattr(self, name, int(value))

    @classmethod
    def from_table(cls, table: dict[str, Any], where: str = "[attack]") -> "AttackConfig":
        """The config an ``[attack]`` table describes (what config files and ``dsn-robust run`` use)."""
        return build(cls, dict(table), where=where)

    def expanded_attacks(self) -> list[str]:
        """Attack names with aliases expanded (``apgd`` -> ``apgd-ce``, ``apgd-dlr``), in order, once each."""
        return _dedupe(sum((ATTACK_ALIASES.get(a, [a]) for a in self.attacks), []))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Evaluations
# --------------------------------------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "_"


@dataclass
class EvalPlan:
    """One evaluation: an attack object plus where and how it is run and scored."""

    attack: Attack
    eps: list[float]
    gate_mode: str
    gate_grad: str
    target: str
    source_run: str = ""

    @property
    def name(self) -> str:
        return self.attack.name

    @property
    def backend(self) -> str:
        return self.attack.backend

    @property
    def norm(self) -> str:
        return self.attack.norm

    @property
    def id(self) -> str:
        base = "__".join([self.name, self.backend, self.norm, self.gate_mode, self.gate_grad, self.target])
        return base + (f"__from-{_safe(self.source_run)}" if self.source_run else "")

    def describe(self, complete: bool = False) -> dict[str, Any]:
        return {"id": self.id, "attack": self.name, "backend": self.backend, "norm": self.norm,
                "eps": list(self.eps), "gate_mode": self.gate_mode, "gate_grad": self.gate_grad,
                "target": self.target, "source_run": self.source_run, "config": _jsonable(self.attack.config()),
                "complete": bool(complete)}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def plan_evaluations(config: AttackConfig, gated: bool, source_run: str = "") -> list[EvalPlan]:
    """The evaluations ``config`` asks for on a model that is ``gated`` (or not), with skips logged."""
    plans: list[EvalPlan] = []
    collapsed: set[str] = set()
    for name in config.expanded_attacks():
        available = backends_for(name)
        chosen = [b for b in available if b == "native" or b in config.backends]
        if not chosen:
            log.info("skipping %s: it exists only in %s (asked for %s)", name, ", ".join(available),
                     ", ".join(config.backends))
            continue
        for backend in chosen:
            cls = attack_class(name, backend)
            if config.norm in cls.norms:
                norm, eps = config.norm, config.eps
            else:
                norm = cls.norms[0]
                eps = config.cw_eps if norm == "l2" else config.eps
            attack = cls.from_config(config, norm)
            for mode in config.gate_modes:
                grads = config.gate_grads
                if not gated or mode != "hard" or cls.gradient_free:
                    if grads != ["none"]:
                        why = ("the model the examples are crafted on has no gates" if not gated else
                               f"gate mode {mode!r} has no routing" if mode != "hard" else f"{name} is gradient-free")
                        if why not in collapsed:
                            log.info("routing gradients collapse to 'none': %s", why)
                            collapsed.add(why)
                    grads = ["none"]
                for grad in grads:
                    plans.append(EvalPlan(attack, list(eps), mode, grad, config.target, source_run))
    if not plans:
        raise ConfigError("nothing to run: no requested attack exists in the requested backend(s) "
                          f"{', '.join(config.backends)}")
    return plans


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_run_checkpoint(run: RunDir) -> Checkpoint:
    """The run's best checkpoint, else its last; CheckpointError when it has neither."""
    if not run.root.is_dir():
        raise RunDirError(f"run directory {run.root} does not exist")
    for path in (run.best_checkpoint, run.last_checkpoint):
        if path.is_file():
            return load_checkpoint(path)
    raise CheckpointError(f"{run.root} has no checkpoint (looked for {run.best_checkpoint.relative_to(run.root)} "
                          f"and {run.last_checkpoint.relative_to(run.root)}); train it first with "
                          f"`dsn-robust train`")


def load_eval_data(run: RunDir, checkpoint: Checkpoint, n: int) -> tuple[CoarseFineDataset, dict[str, Any]]:
    """The first ``n`` test samples of the data the run was trained on (from its ``config.json``)."""
    if not run.config.is_file():
        raise RunDirError(f"{run.root} has no config.json: cannot tell which data its model was trained on")
    try:
        cfg = json.loads(run.config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunDirError(f"cannot read {run.config}: {err}") from None
    if not isinstance(cfg, dict) or not cfg.get("dataset"):
        raise RunDirError(f"{run.config} does not name a dataset")
    options = cfg.get("data_options") or {}
    if not isinstance(options, dict):
        raise RunDirError(f"{run.config}: data_options must be a JSON object")
    data = {"dataset": cfg["dataset"], "data_root": cfg.get("data_root"), "data_options": options, "split": "test"}
    test = load_dataset(cfg["dataset"], "test", root=cfg.get("data_root"), **options)
    problems = test.info.differences(checkpoint.dataset)
    if problems:
        raise CheckpointError(f"{checkpoint.path}: the run's test data does not match its checkpoint: "
                              f"{'; '.join(problems)}")
    if len(test) < n:
        log.info("the test split has %d samples; evaluating all of them (asked for %d)", len(test), n)
    return test.subset(n), data


# --------------------------------------------------------------------------------------------------------------
# One batch x one evaluation
# --------------------------------------------------------------------------------------------------------------


def derive_seed(seed: int, *parts: Any) -> int:
    """A seed in [0, 2**31) determined by ``seed`` and ``parts`` (stable across processes and runs)."""
    text = "|".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % (2 ** 31)


def bit_strings(bits: torch.Tensor) -> list[str]:
    """Rows of a bool [B, n] tensor as '0101' strings ('' for n = 0)."""
    arr = bits.detach().cpu().numpy().astype(bool)
    if arr.shape[1] == 0:
        return [""] * arr.shape[0]
    chars = np.where(arr, "1", "0")
    return ["".join(row) for row in chars]


@dataclass
class Batch:
    """One batch of evaluation data and the clean outcome per gate mode."""

    index: int
    samples: np.ndarray
    x: torch.Tensor
    fine: torch.Tensor
    coarse: torch.Tensor
    clean: dict[str, Outcome] = field(default_factory=dict)

    def labels(self, head: str) -> torch.Tensor:
        return self.fine if head == "fine" else self.coarse


@dataclass
class Scorer:
    """Turns adversarial batches into records: budget checks, deterministic re-evaluation, frozen-path control."""

    model: CoarseFineNet
    run_name: str
    model_name: str
    seed: int

    def clean(self, batch: Batch, gate_mode: str) -> Outcome:
        if gate_mode not in batch.clean:
            seed_everything(derive_seed(self.seed, "clean", gate_mode, batch.index))
            batch.clean[gate_mode] = evaluate(self.model, batch.x, gate_mode)
        return batch.clean[gate_mode]

    def frozen(self, adv: torch.Tensor, outcome: Outcome, clean: Outcome) -> tuple[torch.Tensor, torch.Tensor]:
        """Predictions on ``adv`` with the gates frozen to the clean path.

        Where the adversarial path equals the clean one the frozen forward *is* the adversarial forward, so only
        samples whose path changed are recomputed.
        """
        fine, coarse = outcome.fine.clone(), outcome.coarse.clone()
        changed = (outcome.path != clean.path).any(1) if clean.path.shape[1] else None
        if changed is not None and changed.any():
            idx = changed.nonzero().squeeze(1)
            frozen = evaluate(self.model, adv.index_select(0, idx), "frozen", path=clean.path.index_select(0, idx))
            fine[idx], coarse[idx] = frozen.fine, frozen.coarse
        return fine, coarse

    def score(self, plan: EvalPlan, batch: Batch, advs: Sequence[torch.Tensor], unit_seed: int) -> pd.DataFrame:
        """Records of ``advs`` (one per eps of ``plan``) on ``batch``, built directly with the contract's columns and
        dtypes (:data:`attacks.records.RECORD_COLUMNS`); raises BudgetViolation before anything else."""
        norms = [check_budget(batch.x, adv, e, plan.norm, attack=plan.name, backend=plan.backend)
                 for e, adv in zip(plan.eps, advs)]
        clean = self.clean(batch, plan.gate_mode)
        y = batch.labels(plan.target)
        b = len(batch.samples)
        clean_correct = (clean.pred(plan.target) == y).cpu().numpy()
        clean_path = bit_strings(clean.path)
        parts: list[dict[str, Any]] = []
        for k, (e, adv, (linf, l2)) in enumerate(zip(plan.eps, advs, norms)):
            if e == 0:
                outcome = clean  # the adversarial image is the clean image
                frozen_fine, frozen_coarse = clean.fine, clean.coarse
            else:
                seed_everything(derive_seed(unit_seed, "eval", k))
                outcome = evaluate(self.model, adv, plan.gate_mode)
                frozen_fine, frozen_coarse = self.frozen(adv, outcome, clean)
            adv_correct = (outcome.pred(plan.target) == y).cpu().numpy()
            frozen_pred = frozen_fine if plan.target == "fine" else frozen_coarse
            parts.append({
                "eps": np.full(b, float(e)), "sample": batch.samples,
                "label_fine": batch.fine.cpu().numpy(), "label_coarse": batch.coarse.cpu().numpy(),
                "clean_pred_fine": clean.fine.cpu().numpy(), "clean_pred_coarse": clean.coarse.cpu().numpy(),
                "adv_pred_fine": outcome.fine.cpu().numpy(), "adv_pred_coarse": outcome.coarse.cpu().numpy(),
                "clean_correct": clean_correct, "adv_correct": adv_correct, "success": clean_correct & ~adv_correct,
                "linf": linf.cpu().numpy(), "l2": l2.cpu().numpy(),
                "clean_path": clean_path, "adv_path": clean_path if outcome is clean else bit_strings(outcome.path),
                "hamming": (clean.path != outcome.path).sum(1).cpu().numpy(),
                "clean_macs": clean.macs.cpu().numpy(), "adv_macs": outcome.macs.cpu().numpy(),
                "frozen_pred_fine": frozen_fine.cpu().numpy(), "frozen_pred_coarse": frozen_coarse.cpu().numpy(),
                "frozen_correct": (frozen_pred == y).cpu().numpy(),
            })
        rows = b * len(parts)
        constant = {"run": self.run_name, "model": self.model_name, "attack": plan.name, "backend": plan.backend,
                    "norm": plan.norm, "gate_mode": plan.gate_mode, "gate_grad": plan.gate_grad,
                    "target": plan.target, "source_run": plan.source_run, "seed": self.seed}
        columns = {}
        for name, dtype in RECORD_COLUMNS.items():
            if name in constant:
                values = np.full(rows, constant[name], dtype=object if dtype == "string" else dtype)
            elif dtype == "string":
                values = np.concatenate([np.asarray(p[name], dtype=object) for p in parts]) if parts else []
            else:
                values = np.concatenate([np.asarray(p[name]) for p in parts]).astype(dtype, copy=False)
            columns[name] = pd.array(values, dtype="string") if dtype == "string" else values
        return pd.DataFrame(columns, copy=False)


def craft(plan: EvalPlan, crafting: Target, batch: Batch, unit_seed: int) -> list[torch.Tensor]:
    """Adversarial batches for every eps of ``plan`` (eps 0 is the clean image itself)."""
    y = batch.labels(plan.target)
    positive = [e for e in plan.eps if e > 0]
    seed_everything(unit_seed)
    made = plan.attack.perturb(crafting, batch.x, y, positive, unit_seed) if positive else []
    if len(made) != len(positive):
        raise RuntimeError(f"{plan.id}: attack returned {len(made)} batches for {len(positive)} budgets")
    it = iter(made)
    return [batch.x.clone() if e == 0 else next(it).detach().to(batch.x.dtype) for e in plan.eps]


# --------------------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    created: bool = False

    @classmethod
    def setup(cls, device: torch.device) -> "_Dist":
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist
        created = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            created = True
        return cls(dist.get_rank(), dist.get_world_size(), created)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        if self.created:
            import torch.distributed as dist
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


@dataclass
class AttackResult:
    """What :func:`run_attacks` did: the manifest it wrote and every record now in the run (rank 0 only)."""

    run_dir: Path
    manifest: dict[str, Any]
    records: pd.DataFrame


def has_records(run: RunDir) -> bool:
    return run.records.is_dir() and any(run.records.rglob("*.parquet"))


def _shard(run: RunDir, plan: EvalPlan, batch: int) -> Path:
    return run.records / plan.id / f"shard-{batch:05d}.parquet"


def _read_manifest(run: RunDir) -> dict[str, Any] | None:
    if not run.manifest.is_file():
        return None
    try:
        value = json.loads(run.manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunDirError(f"cannot read {run.manifest}: {err}; rerun with --force to start over") from None
    return value if isinstance(value, dict) else None


def _check_resumable(run: RunDir, previous: dict[str, Any] | None, setup: dict[str, Any],
                     plans: Sequence[EvalPlan]) -> None:
    if previous is None:
        raise RunDirError(f"{run.root} holds attack records but no {run.manifest.name}; cannot tell how they were "
                          f"made: pass --force to replace them")
    for key in ("n", "batch_size", "seed"):
        if previous.get(key) != setup[key]:
            raise RunDirError(f"{run.root}: existing attack records were made with {key}={previous.get(key)!r}, "
                              f"this run asks for {key}={setup[key]!r}; use the same value or pass --force")
    before = {e.get("id"): e for e in previous.get("evaluations", [])}
    for plan in plans:
        old = before.get(plan.id)
        if old is None:
            continue
        new = plan.describe()
        for key in ("eps", "config"):
            if _jsonable(old.get(key)) != new[key]:
                raise RunDirError(f"{run.root}: evaluation {plan.id} was run with {key}={old.get(key)!r}, this run "
                                  f"asks for {new[key]!r}; use the same settings or pass --force")


def _complete(run: RunDir, eval_id: str, n_batches: int) -> bool:
    folder = run.records / eval_id
    return all((folder / f"shard-{b:05d}.parquet").is_file() for b in range(n_batches))


def run_attacks(run_dir: str | os.PathLike[str], config: AttackConfig, resume: bool = False,
                transfer_from: str | os.PathLike[str] | None = None, progress: bool = True, *, force: bool = False,
                on_shard: Callable[[Path], None] | None = None) -> AttackResult:
    """Attack the model of ``run_dir`` as ``config`` says and write records, manifest and worst case into it.

    ``resume`` skips shards that exist (never duplicating rows); ``force`` deletes previous attack results first;
    with neither, a run that already holds records is a RunDirError. ``transfer_from`` (another run directory)
    crafts the examples white-box on that run's model and scores them on this one (``source_run`` = its name).
    ``on_shard(path)`` is called after each shard is written.
    """
    if resume and force:
        raise ConfigError("--resume and --force exclude each other")
    run = RunDir.at(run_dir)
    checkpoint = load_run_checkpoint(run)
    device = resolve_device(config.device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    model = checkpoint.build_model(device).requires_grad_(False)  # attacks need input gradients only
    data, data_source = load_eval_data(run, checkpoint, config.n)
    n = len(data)

    crafting_model, source_name = model, ""
    if transfer_from is not None:
        source_run = RunDir.at(transfer_from)
        source_ckpt = load_run_checkpoint(source_run)
        check_transferable(source_ckpt.dataset, checkpoint.dataset, source_run.name, run.name)
        if source_run.root.resolve() == run.root.resolve():
            raise ConfigError("--transfer-from names the attacked run itself; transfer needs another run")
        crafting_model, source_name = source_ckpt.build_model(device).requires_grad_(False), source_run.name

    plans = plan_evaluations(config, crafting_model.is_gated, source_name)
    info = checkpoint.dataset
    head_classes = info.num_fine if config.target == "fine" else info.num_coarse
    if head_classes < 3 and any(p.name == "apgd-dlr" for p in plans):
        raise ConfigError(f"apgd-dlr needs at least 3 classes; the {config.target} head has {head_classes}")

    n_batches = math.ceil(n / config.batch_size)
    setup = {"n": n, "batch_size": config.batch_size, "seed": config.seed}
    previous = _read_manifest(run)
    existing = has_records(run)
    if existing:
        if force:
            pass
        elif not resume:
            raise RunDirError(f"{run.root} already holds attack records; pass --resume to continue (or add to) "
                              f"them or --force to replace them")
        else:
            _check_resumable(run, previous, setup, plans)

    dist = _Dist.setup(device)
    try:
        dist.barrier()
        if dist.rank == 0:
            if force and run.attacks.exists():
                log.info("--force: deleting previous attack results in %s", run.attacks)
                shutil.rmtree(run.records, ignore_errors=True)
                for stale in (run.manifest, run.attacks / "worst_case.parquet"):
                    stale.unlink(missing_ok=True)
                previous = None
            zero = _zero_gradient_shares(model, data, config, plans)
            if previous and resume and existing:
                zero = {**previous.get("zero_grad_share", {}), **zero}
            manifest = _manifest(run, checkpoint, model, config, data_source, setup, n_batches, zero, plans,
                                 previous if resume and existing else None)
            atomic_write_json(run.manifest, manifest)
        dist.barrier()

        _attack_batches(run, checkpoint.model_name, model, crafting_model, data, config, plans, n_batches, dist,
                        progress, on_shard)

        dist.barrier()
        if dist.rank != 0:
            return AttackResult(run.root, {}, conform(pd.DataFrame(columns=list(RECORD_COLUMNS))))
        manifest = _read_manifest(run) or {}
        for entry in manifest.get("evaluations", []):
            entry["complete"] = _complete(run, entry["id"], manifest.get("n_batches", n_batches))
        atomic_write_json(run.manifest, manifest)
        records = read_records(run.records) if has_records(run) else conform(
            pd.DataFrame(columns=list(RECORD_COLUMNS)))
        accuracy = records[~records["attack"].isin(list(NON_ACCURACY))]
        worst = worst_case(accuracy)
        atomic_write(run.attacks / "worst_case.parquet", lambda tmp: worst.to_parquet(tmp, index=False))
        return AttackResult(run.root, manifest, records)
    finally:
        dist.close()


def _zero_gradient_shares(model: CoarseFineNet, data: CoarseFineDataset, config: AttackConfig,
                          plans: Sequence[EvalPlan]) -> dict[str, float]:
    """Share of zero input gradients on the first batch, per (gate_mode, gate_grad) of the white-box plans."""
    x, fine, coarse = data.batch(slice(0, config.batch_size))
    device = next(model.parameters()).device
    x, y = x.to(device), (fine if config.target == "fine" else coarse).to(device)
    shares: dict[str, float] = {}
    combos = _dedupe([(p.gate_mode, p.gate_grad) for p in plans if not p.source_run])
    if not model.is_gated:
        combos = _dedupe([(mode, "none") for mode, _ in combos])
    for mode, grad in combos:
        seed_everything(derive_seed(config.seed, "zero-grad", mode, grad))
        shares[f"{mode}/{grad}"] = zero_gradient_share(model, x, y, mode, grad, config.target, config.eot_samples)
    return shares


def _manifest(run: RunDir, checkpoint: Checkpoint, model: CoarseFineNet, config: AttackConfig,
              data_source: dict[str, Any], setup: dict[str, Any], n_batches: int, zero: dict[str, float],
              plans: Sequence[EvalPlan], previous: dict[str, Any] | None) -> dict[str, Any]:
    current = [p.describe(_complete(run, p.id, n_batches)) for p in plans]
    ids = {e["id"] for e in current}
    kept = [dict(e, complete=_complete(run, e["id"], n_batches))
            for e in (previous or {}).get("evaluations", []) if e.get("id") not in ids]
    return {
        "schema": MANIFEST_SCHEMA,
        "run": run.name,
        "model": checkpoint.model_name,
        "checkpoint": str(checkpoint.path.relative_to(run.root)) if checkpoint.path else "",
        "dataset": checkpoint.dataset.to_dict(),
        "data": _jsonable(data_source),
        "seed": setup["seed"],
        "n": setup["n"],
        "batch_size": setup["batch_size"],
        "n_batches": n_batches,
        "versions": package_versions(),
        "path_names": list(model.gate_names),
        "full_macs": float(model.full_macs),
        "gated_block_macs": [float(m) for m in model.costs.gated_blocks],
        "zero_grad_share": zero,
        "config": _jsonable(config.to_dict()),
        "evaluations": kept + current,
    }


def _attack_batches(run: RunDir, model_name: str, model: CoarseFineNet, crafting_model: CoarseFineNet,
                    data: CoarseFineDataset, config: AttackConfig, plans: Sequence[EvalPlan], n_batches: int,
                    dist: _Dist, progress: bool, on_shard: Callable[[Path], None] | None) -> None:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    scorer = Scorer(model, run.name, model_name, config.seed)
    mine = [b for b in range(n_batches) if b % dist.world == dist.rank]
    skipped = 0
    bar = tqdm(total=len(mine) * len(plans), desc=f"attack {run.name}", unit="eval", dynamic_ncols=True,
               disable=not progress or dist.rank != 0)
    try:
        for b in mine:
            todo = [p for p in plans if not _shard(run, p, b).is_file()]
            skipped += len(plans) - len(todo)
            bar.update(len(plans) - len(todo))
            if not todo:
                continue
            lo = b * config.batch_size
            hi = min(lo + config.batch_size, len(data))
            x, fine, coarse = data.batch(slice(lo, hi))
            batch = Batch(b, np.arange(lo, hi), x.to(device), fine.to(device), coarse.to(device))
            for plan in todo:
                unit_seed = derive_seed(config.seed, plan.id, b)
                crafting = Target(crafting_model, plan.target, plan.gate_mode, plan.gate_grad, config.eot_samples,
                                  device)
                advs = craft(plan, crafting, batch, unit_seed)
                frame = scorer.score(plan, batch, advs, unit_seed)
                path = _shard(run, plan, b)
                atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))
                bar.update(1)
                if on_shard is not None:
                    on_shard(path)
    finally:
        bar.close()
    if skipped:
        log.info("resume: %d finished shard(s) kept", skipped)
